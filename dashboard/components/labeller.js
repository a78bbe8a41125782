// Loupe's labeller: focus mode and the grid, in the browser.
//
// Python sends a window of images ahead (as small JPEG data URLs); a key press labels the image
// on screen and shows the next one from the window at once. Every label is an event with a unique
// id (this page load's client id + a sequence number), kept in sessionStorage and resent until
// Python acknowledges it, so a rerun, a reconnect or a reload neither loses nor doubles one.

const STORE_PREFIX = "loupe-labeller:";
const MAX_KEPT_ITEMS = 400;

// "Find similar" travels with the events, so a rerun under way cannot lose it; its token makes it happen once.
function findSimilar(outbox, imageId) {
  outbox.extra.similar = { token: randomId(), image_id: imageId };
  outbox.request(outbox.current);
}

function classKeyOf(classes, key) {
  const found = classes.find((c) => c.key === key.toLowerCase());
  return found ? found.name : null;
}

function classButtons(classes, onPick) {
  const box = element("div", "loupe-classes");
  for (const c of classes) {
    const button = element("button", "loupe-class");
    button.type = "button";
    button.dataset.className = c.name;
    if (c.key) button.append(element("kbd", "", c.key.toUpperCase()), document.createTextNode(" · "));
    button.append(document.createTextNode(c.name));
    button.addEventListener("click", () => {
      // A focused button would take the next Space or Enter as another click.
      button.blur();
      onPick(c.name);
    });
    box.append(button);
  }
  return box;
}

class FocusView {
  constructor(root, outbox) {
    this.root = root;
    this.outbox = outbox;
    this.items = new Map();
    this.order = [];
    this.current = null;
    this.history = [];
    this.passed = new Set();
    this.localLabels = new Map();
    this.showToken = null;
    this.data = { classes: [], remaining: 0 };
    root.replaceChildren();
    this.stage = element("div", "loupe-stage");
    this.side = element("div", "loupe-side");
    this.title = element("div", "loupe-title");
    this.meta = element("div", "loupe-meta");
    this.counter = element("div", "loupe-counter");
    this.suggest = element("button", "loupe-suggest");
    this.suggest.type = "button";
    this.suggest.addEventListener("click", () => this.acceptSuggestion());
    this.classBox = element("div");
    const help = element(
      "div", "loupe-help",
      "Keys: the class key labels · Enter accepts the suggestion · Space skips · ← → move · U undoes your last label · F finds similar images",
    );
    const similar = element("button", "loupe-similar", "Find similar (F)");
    similar.type = "button";
    similar.addEventListener("click", () => {
      similar.blur();
      if (this.current !== null) findSimilar(this.outbox, this.current);
    });
    this.side.append(this.title, this.meta, this.counter, this.suggest, this.classBox, similar, help);
    root.append(this.stage, this.side);
  }

  update(data) {
    this.data = data;
    const missing = [];
    for (const item of data.window || []) {
      const known = this.items.get(item.id);
      // Python sends a picture once per mount of this component; later windows carry only its id.
      if (known && (!item.src || known.src === item.src)) {
        Object.assign(known, { ...item, src: known.src, img: known.img });
      } else if (!item.src) {
        missing.push(item.id);
      } else {
        const img = new Image();
        img.className = "loupe-shown";
        img.alt = item.name || "";
        img.dataset.imageId = String(item.id);
        img.src = item.src;
        img.decode().catch(() => {});
        this.items.set(item.id, { ...item, img });
      }
    }
    this.outbox.missing = missing;
    this.order = (data.window || []).map((item) => item.id).filter((id) => this.items.has(id));
    this.prune();
    this.classBox.replaceChildren(classButtons(data.classes || [], (name) => this.label(name)));
    const show = data.show;
    if (show && show.token !== this.showToken) {
      this.showToken = show.token;
      if (this.items.has(show.id)) {
        if (this.current !== null && this.current !== show.id) this.history.push(this.current);
        this.passed.delete(show.id);
        this.localLabels.delete(show.id);  // an undo brought it back: Python's label is the one to show
        this.display(show.id);
        return;
      }
    }
    if (this.current === null || !this.items.has(this.current)) this.display(this.upcoming()[0] ?? null);
    else this.renderSide();
  }

  prune() {
    if (this.items.size <= MAX_KEPT_ITEMS) return;
    const keep = new Set([...this.order, ...this.history.slice(-100), this.current]);
    for (const id of this.items.keys()) if (!keep.has(id)) this.items.delete(id);
    this.history = this.history.filter((id) => this.items.has(id));
  }

  upcoming() {
    return this.order.filter((id) => id !== this.current && !this.passed.has(id));
  }

  display(id) {
    const moved = id !== this.current;
    this.current = id;
    const item = id === null ? null : this.items.get(id);
    if (item) {
      this.stage.replaceChildren(item.img);
    } else {
      const left = this.remaining();
      this.stage.replaceChildren(
        element("div", "loupe-empty", left > 0 ? "Loading the next images…" : "Every image in this order is labelled."),
      );
    }
    this.renderSide();
    // Python anchors the next window on the image on screen.
    if (moved) this.outbox.request(this.current);
  }

  remaining() {
    const pendingNew = this.outbox.events.filter(
      (event) => event.kind === "label" && event.image_ids.every((id) => !(this.items.get(id) || {}).label),
    ).length;
    return Math.max(0, (this.data.remaining || 0) - pendingNew);
  }

  renderSide() {
    const item = this.current === null ? null : this.items.get(this.current);
    this.counter.textContent = `${this.remaining()} left in this order`;
    if (!item) {
      this.title.textContent = "";
      this.meta.textContent = "";
      this.suggest.hidden = true;
      return;
    }
    const label = this.localLabels.get(item.id) ?? item.label;
    this.title.replaceChildren(element("strong", "", `#${item.id}`), document.createTextNode(` ${item.name}`));
    this.meta.textContent = `${item.caption} · label: ${label || "unlabelled"}`;
    this.suggest.hidden = !item.suggestion || Boolean(label);
    if (item.suggestion) {
      this.suggest.textContent = `Enter · accept the model's suggestion: ${item.suggestion} (${item.confidence})`;
    }
    for (const button of this.classBox.querySelectorAll("button")) {
      button.classList.toggle("loupe-chosen", button.dataset.className === (label || item.suggestion));
    }
  }

  label(name) {
    const id = this.current;
    if (id === null || !name) return;
    this.outbox.add({ kind: "label", image_ids: [id], class_name: name });
    this.localLabels.set(id, name);
    this.advance();
  }

  acceptSuggestion() {
    const item = this.current === null ? null : this.items.get(this.current);
    if (item && item.suggestion) this.label(item.suggestion);
  }

  advance() {
    if (this.current !== null) {
      this.passed.add(this.current);
      this.history.push(this.current);
    }
    const next = this.upcoming()[0] ?? null;
    this.display(next);
  }

  back() {
    const previous = this.history.pop();
    if (previous === undefined) return;
    this.passed.delete(previous);
    this.display(previous);
  }

  onKey(event) {
    const key = event.key;
    if (key === "ArrowLeft") this.back();
    else if (key === "ArrowRight" || key === " ") this.advance();
    else if (key === "Enter") this.acceptSuggestion();
    else if (key === "u" || key === "U") {
      this.outbox.add({ kind: "undo" });
      this.outbox.request(this.current);
    } else if ((key === "f" || key === "F") && this.current !== null) findSimilar(this.outbox, this.current);
    else {
      const name = classKeyOf(this.data.classes || [], key);
      if (!name) return false;
      this.label(name);
    }
    return true;
  }
}

class GridView {
  constructor(root, outbox) {
    this.root = root;
    this.outbox = outbox;
    this.selected = new Set();
    this.anchor = null;
    this.pageToken = null;
    this.tiles = [];
    this.data = { classes: [] };
    root.replaceChildren();
    this.bar = element("div", "loupe-bar");
    this.count = element("span", "loupe-count");
    this.classBox = element("div");
    this.similar = element("button", "loupe-similar", "Find similar (F)");
    this.similar.type = "button";
    this.similar.addEventListener("click", () => this.findSimilar());
    this.bar.append(this.count, this.classBox, this.similar);
    this.grid = element("div", "loupe-tiles");
    root.append(this.bar, this.grid);
  }

  update(data) {
    this.data = data;
    if (data.page_token !== this.pageToken) {
      this.pageToken = data.page_token;
      this.selected.clear();
      this.anchor = null;
    }
    this.classBox.replaceChildren(classButtons(data.classes || [], (name) => this.assign(name)));
    const ids = new Set((data.tiles || []).map((tile) => tile.id));
    for (const id of [...this.selected]) if (!ids.has(id)) this.selected.delete(id);
    this.tiles = (data.tiles || []).map((tile, index) => this.tile(tile, index));
    this.grid.replaceChildren(...this.tiles.map((t) => t.node));
    this.renderSelection();
  }

  tile(tile, index) {
    const node = element("figure", "loupe-tile");
    node.dataset.imageId = String(tile.id);
    const img = element("img");
    img.src = tile.src;
    img.alt = tile.name || "";
    img.draggable = false;
    const caption = element("figcaption", "", `#${tile.id} · ${tile.label || "unlabelled"}`);
    caption.title = tile.caption || "";
    node.append(img, caption);
    node.addEventListener("click", (event) => this.click(index, event));
    return { ...tile, node, caption };
  }

  click(index, event) {
    const id = this.tiles[index].id;
    if (event.shiftKey && this.anchor !== null) {
      const [from, to] = [Math.min(this.anchor, index), Math.max(this.anchor, index)];
      for (let i = from; i <= to; i += 1) this.selected.add(this.tiles[i].id);
    } else if (this.selected.has(id)) {
      this.selected.delete(id);
    } else {
      this.selected.add(id);
    }
    this.anchor = index;
    this.renderSelection();
  }

  renderSelection() {
    for (const tile of this.tiles) tile.node.classList.toggle("loupe-selected", this.selected.has(tile.id));
    this.root.dataset.selected = String(this.selected.size);
    this.count.textContent = this.selected.size
      ? `${this.selected.size} selected: press a class key or click a class`
      : "Click to select, Shift+click for a range, Ctrl+A for the page";
    this.similar.disabled = this.selected.size !== 1;
  }

  assign(name) {
    if (!this.selected.size || !name) return;
    const ids = this.tiles.filter((t) => this.selected.has(t.id)).map((t) => t.id);
    this.outbox.add({ kind: "label", image_ids: ids, class_name: name });
    for (const tile of this.tiles) {
      if (this.selected.has(tile.id)) tile.caption.textContent = `#${tile.id} · ${name}`;
    }
    this.selected.clear();
    this.anchor = null;
    this.renderSelection();
    this.outbox.request(null);
  }

  findSimilar() {
    if (this.selected.size === 1) findSimilar(this.outbox, [...this.selected][0]);
  }

  onKey(event) {
    const key = event.key;
    if ((event.ctrlKey || event.metaKey) && key.toLowerCase() === "a") {
      for (const tile of this.tiles) this.selected.add(tile.id);
      this.renderSelection();
    } else if (event.ctrlKey || event.metaKey) {
      return false;
    } else if (key === "Escape") {
      this.selected.clear();
      this.renderSelection();
    } else if (key === "f" || key === "F") {
      this.findSimilar();
    } else {
      const name = classKeyOf(this.data.classes || [], key);
      if (!name || !this.selected.size) return false;
      this.assign(name);
    }
    return true;
  }
}

export default function (component) {
  const { data, parentElement, setStateValue } = component;
  let state = parentElement.__loupeLabeller;
  if (!state || state.mode !== data.mode) {
    if (state) state.destroy();
    state = createState(parentElement, data);
    parentElement.__loupeLabeller = state;
  }
  state.outbox.send = setStateValue;
  state.outbox.acknowledge(data.acked);
  const similar = state.outbox.extra.similar;
  if (similar && (data.similar_done || []).includes(similar.token)) delete state.outbox.extra.similar;
  state.view.update(data);
  // New data means the page finished a rerun: send what waited, and events left from before a
  // reload or a mode switch.
  state.outbox.received();
  return () => {
    state.destroy();
    delete parentElement.__loupeLabeller;
  };
}

function createState(parentElement, data) {
  const root = element("div", `loupe-labeller loupe-${data.mode}`);
  // Only our own earlier root goes: Streamlit keeps the component's stylesheet in this element too.
  for (const old of parentElement.querySelectorAll(":scope > .loupe-labeller")) old.remove();
  parentElement.append(root);
  const state = { mode: data.mode };
  state.outbox = new Outbox(STORE_PREFIX + data.channel, () => {
    root.dataset.pending = String(state.outbox.pending);
  });
  root.dataset.pending = String(state.outbox.pending);
  state.view = data.mode === "grid" ? new GridView(root, state.outbox) : new FocusView(root, state.outbox);
  const onKey = (event) => {
    if (event.defaultPrevented || event.repeat || event.altKey || typingInto(event.target)) return;
    if (state.mode === "focus" && (event.ctrlKey || event.metaKey)) return;
    if (state.view.onKey(event)) event.preventDefault();
  };
  const resend = setInterval(() => {
    if (state.outbox.waiting && Date.now() - state.outbox.lastSentAt > RESEND_AFTER_MS) state.outbox.flush();
  }, 500);
  document.addEventListener("keydown", onKey);
  state.destroy = () => {
    document.removeEventListener("keydown", onKey);
    clearInterval(resend);
    root.remove();
  };
  return state;
}
