// Loupe's review gallery: a queue's thumbnails; one image opened large beside its Grad-CAM maps;
// decisions by key on the image on screen.
//
// Python sends the queue (thumbnails) and, for the image open and the next ones in the queue, the
// large picture and its maps. A decision is an event with a unique id (this mount's client id + a
// sequence number) carrying the image it was made on, kept in sessionStorage and resent until
// Python acknowledges it, so a rerun, a reconnect or a reload neither loses nor doubles one.
// Every name from Python is set as text, never as markup.

const STORE_PREFIX = "loupe-reviewer:";
// While maps are still being computed: how often to look for more, and for how long (5 minutes).
const LOOK_AGAIN_MS = 2000;
const MAX_EMPTY_REPLIES = 150;

function button(className, key, text, onClick) {
  const node = element("button", className);
  node.type = "button";
  if (key) node.append(element("kbd", "", key), document.createTextNode(" · "));
  node.append(document.createTextNode(text));
  node.addEventListener("click", () => {
    // A focused button would take the next Space or Enter as another click.
    node.blur();
    onClick();
  });
  return node;
}

function picture(src, className, alt, imageId) {
  const img = new Image();
  img.className = className;
  img.alt = alt;
  img.dataset.imageId = String(imageId);
  img.src = src;
  return img;
}

class Reviewer {
  constructor(root, outbox) {
    this.root = root;
    this.outbox = outbox;
    this.items = [];
    this.byId = new Map();
    this.thumbs = new Map();  // image id -> its thumbnail's data URL
    this.large = new Map();  // image id -> {img, cams: [{title, classIndex, img}]}
    this.decided = new Map();  // image id -> what was decided here, until Python's queue says so
    this.current = null;
    this.tileNodes = new Map();
    this.gallerySignature = null;
    this.later = null;
    this.emptyReplies = 0;
    this.data = { classes: [] };
    this.gallery = element("div", "loupe-review-gallery");
    this.header = element("div", "loupe-review-header");
    this.tiles = element("div", "loupe-review-tiles");
    this.gallery.append(this.header, this.tiles);
    this.opened = element("div", "loupe-review-open");
    root.replaceChildren(this.gallery, this.opened);
    this.buildOpened();
  }

  buildOpened() {
    this.stage = element("div", "loupe-review-stage");
    this.side = element("div", "loupe-review-side");
    this.title = element("div", "loupe-review-title");
    this.meta = element("div", "loupe-review-meta");
    this.counter = element("div", "loupe-review-counter");
    this.classBox = element("div", "loupe-review-classes");
    const actions = element("div", "loupe-review-actions");
    actions.append(
      button("loupe-review-action", "C", "Confirm", () => this.decide("confirm")),
      button("loupe-review-action", "A", "Ambiguous", () => this.decide("ambiguous")),
      button("loupe-review-action", "X", "Exclude", () => this.decide("exclude")),
      button("loupe-review-action", "S", "Skip", () => this.step(1)),
      button("loupe-review-action", "K", "Previous", () => this.step(-1)),
      button("loupe-review-action", "J", "Next", () => this.step(1)),
      button("loupe-review-action", "Esc", "Back to the queue", () => this.close()),
    );
    this.comment = element("textarea", "loupe-review-comment");
    this.comment.rows = 2;
    this.comment.maxLength = 2000;
    this.comment.placeholder = "Comment on this image (Enter saves it; keys are off while you type)";
    this.comment.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        this.saveComment();
      } else if (event.key === "Escape") {
        this.comment.blur();
      }
    });
    const help = element(
      "div", "loupe-review-help",
      "Keys: C confirms the label · 1-9 relabel · A ambiguous · X excludes · S skips · J/K next/previous · Esc back to the queue",
    );
    this.side.append(this.title, this.meta, this.counter, actions, this.classBox, this.comment, help);
    this.opened.append(this.stage, this.side);
  }

  update(data) {
    this.data = data;
    this.items = data.items || [];
    this.byId = new Map(this.items.map((item) => [item.id, item]));
    for (const id of [...this.decided.keys()]) {
      if ((this.byId.get(id) || {}).reviewed) this.decided.delete(id);
    }
    // Python sends a picture once per mount; one it sent that never arrived is asked for again.
    const missing = [];
    for (const item of this.items) {
      if (item.thumb) this.thumbs.set(item.id, item.thumb);
      else if (item.sent && !this.thumbs.has(item.id)) missing.push(item.id);
    }
    for (const shown of data.window || []) {
      if (shown.sent && !(this.large.get(shown.id) || {}).img) missing.push(shown.id);
      else this.keepLarge(shown);
    }
    this.outbox.missing = missing;
    this.askForMore(data);
    this.classBox.replaceChildren(
      ...(data.classes || []).map((c) => button("loupe-review-class", c.key, c.name, () => this.decide("relabel", c.name))),
    );
    this.renderGallery();
    if (this.current !== null && !this.byId.has(this.current)) this.close();
    else this.render();
  }

  // Python sends the rest of the gallery's large pictures a few at a time, as their maps are ready:
  // ask again at once while a reply brings some, else look again a little later.
  askForMore(data) {
    this.root.dataset.unsent = String(data.unsent || 0);
    clearTimeout(this.later);
    if (!data.unsent) return;
    const brought = (data.window || []).some((shown) => shown.src && shown.id !== this.current);
    this.emptyReplies = brought ? 0 : this.emptyReplies + 1;
    if (brought) this.outbox.wanted = true;
    else if (this.emptyReplies < MAX_EMPTY_REPLIES) {
      this.later = setTimeout(() => this.outbox.request(this.current), LOOK_AGAIN_MS);
    }
  }

  keepLarge(shown) {
    const known = this.large.get(shown.id) || { img: null, cams: [] };
    if (shown.src && (!known.img || known.src !== shown.src)) {
      known.img = picture(shown.src, "loupe-review-shown", shown.name || "", shown.id);
      known.src = shown.src;
    }
    known.note = shown.note || "";
    known.cams = (shown.cams || []).map((cam, index) => {
      const before = known.cams[index];
      if (before && before.classIndex === cam.class_index && before.img && (!cam.src || before.src === cam.src)) {
        return { ...before, title: cam.title };
      }
      const img = cam.src ? picture(cam.src, "loupe-cam", cam.title, shown.id) : null;
      if (img) img.dataset.classIndex = String(cam.class_index);
      return { title: cam.title, classIndex: cam.class_index, src: cam.src, img };
    });
    this.large.set(shown.id, known);
  }

  remaining() {
    const pendingNew = [...this.decided.keys()].filter((id) => !(this.byId.get(id) || {}).reviewed).length;
    return Math.max(0, (this.data.remaining || 0) - pendingNew);
  }

  renderGallery() {
    // Rebuilt only when the queue changed: new tiles would decode every thumbnail again.
    const signature = JSON.stringify(this.items.map(
      (i) => [i.id, i.name, i.label, i.predicted, i.confidence, i.note, this.thumbs.has(i.id)],
    ));
    if (signature === this.gallerySignature) {
      this.renderProgress();
      return;
    }
    this.gallerySignature = signature;
    this.tileNodes = new Map(this.items.map((item) => [item.id, this.tile(item)]));
    this.tiles.replaceChildren(...this.tileNodes.values());
    this.renderProgress();
  }

  renderProgress() {
    const more = this.data.more ? ` (${this.data.more} more not shown)` : "";
    this.header.textContent = `${this.remaining()} left to review in this queue${more}`;
    for (const [id, node] of this.tileNodes) {
      const item = this.byId.get(id);
      node.classList.toggle("loupe-review-done", Boolean(item.reviewed || this.decided.has(id)));
    }
  }

  tile(item) {
    const node = element("figure", "loupe-review-tile");
    node.dataset.imageId = String(item.id);
    if (this.thumbs.has(item.id)) {
      const img = element("img");
      img.src = this.thumbs.get(item.id);
      img.alt = item.name || "";
      img.draggable = false;
      node.append(img);
    }
    const caption = element("figcaption");
    caption.append(
      element("div", "loupe-review-name", `#${item.id} ${item.name || ""}`),
      element("div", "", `labelled: ${item.label || "—"}`),
      element("div", "", `predicted: ${item.predicted || "—"}${item.confidence ? ` (${item.confidence})` : ""}`),
    );
    if (item.note) caption.append(element("div", "loupe-review-note", item.note));
    node.append(caption);
    node.addEventListener("click", () => this.open(item.id));
    return node;
  }

  open(id) {
    this.current = id;
    this.root.dataset.view = "open";
    this.render();
    const here = (this.large.get(id) || {}).img;
    // Pictures not here yet are worth interrupting a rerun under way for: every report carries all
    // pending events, so the interrupted one loses nothing.
    if (here) this.outbox.request(id);
    else {
      this.outbox.current = id;
      this.outbox.flush();
    }
  }

  close() {
    this.current = null;
    this.root.dataset.view = "gallery";
    this.render();
    this.outbox.request(null);
  }

  render() {
    this.root.dataset.open = this.current === null ? "" : String(this.current);
    this.gallery.hidden = this.current !== null;
    this.opened.hidden = this.current === null;
    this.renderProgress();
    if (this.current === null) return;
    const item = this.byId.get(this.current);
    const large = this.large.get(this.current);
    const panels = [];
    const main = element("figure", "loupe-review-panel");
    if (large && large.img) main.append(large.img);
    else if (this.thumbs.has(this.current)) {
      main.append(picture(this.thumbs.get(this.current), "loupe-review-shown loupe-review-waiting", item ? item.name : "", this.current));
    }
    main.append(element("figcaption", "", "Image"));
    panels.push(main);
    for (const cam of (large && large.cams) || []) {
      const panel = element("figure", "loupe-review-panel");
      panel.append(cam.img || element("div", "loupe-review-wait", "Computing the map…"), element("figcaption", "", cam.title));
      panels.push(panel);
    }
    if (!large) panels.push(element("div", "loupe-review-wait", "Loading…"));
    this.stage.replaceChildren(...panels);
    if (large && large.note) this.stage.append(element("div", "loupe-review-note", large.note));
    const decided = this.decided.get(this.current);
    this.title.replaceChildren(element("strong", "", `#${this.current}`), document.createTextNode(` ${item ? item.name : ""}`));
    this.meta.textContent = item
      ? `labelled: ${item.label || "—"} · predicted: ${item.predicted || "—"}${item.confidence ? ` (${item.confidence})` : ""}`
        + (decided ? ` · decided here: ${decided}` : "")
      : "";
    const position = this.items.findIndex((i) => i.id === this.current);
    this.counter.textContent = `${position + 1} of ${this.items.length} · ${this.remaining()} left to review`;
  }

  decide(decision, className) {
    const id = this.current;
    if (id === null) return;
    const event = { kind: "review", image_id: id, decision };
    if (className) event.class_name = className;
    this.outbox.add(event);
    this.decided.set(id, className ? `relabel to ${className}` : decision);
    this.step(1);
  }

  saveComment() {
    const text = this.comment.value.trim();
    if (this.current === null || !text) return;
    this.outbox.add({ kind: "review", image_id: this.current, decision: "comment", comment: text });
    this.comment.value = "";
    this.comment.blur();
    this.outbox.request(this.current);
  }

  step(delta) {
    if (this.current === null) return;
    const position = this.items.findIndex((i) => i.id === this.current);
    const next = this.items[position + delta];
    if (next) this.open(next.id);
    else this.outbox.request(this.current);
  }

  onKey(event) {
    const key = event.key.toLowerCase();
    if (this.current === null) {
      if ((key === "j" || key === "enter") && this.items.length) {
        const first = this.items.find((i) => !i.reviewed && !this.decided.has(i.id)) || this.items[0];
        this.open(first.id);
        return true;
      }
      return false;
    }
    if (key === "escape") this.close();
    else if (key === "c") this.decide("confirm");
    else if (key === "a") this.decide("ambiguous");
    else if (key === "x") this.decide("exclude");
    else if (key === "s" || key === "j") this.step(1);
    else if (key === "k") this.step(-1);
    else {
      const found = (this.data.classes || []).find((c) => c.key && c.key === key);
      if (!found) return false;
      this.decide("relabel", found.name);
    }
    return true;
  }
}

export default function (component) {
  const { data, parentElement, setStateValue } = component;
  let state = parentElement.__loupeReviewer;
  if (!state || state.token !== data.queue_token) {
    if (state) state.destroy();
    state = createState(parentElement, data);
    parentElement.__loupeReviewer = state;
    // A new mount tells Python its client id at once (pictures sent to an earlier mount are not
    // here), once mounted: a report sent while Streamlit is still mounting it is lost.
    setTimeout(() => state.outbox.flush(), 0);
  }
  state.outbox.send = setStateValue;
  state.outbox.acknowledge(data.acked);
  state.view.update(data);
  // New data means the gallery finished a rerun: send what waited, and events left from before a reload.
  state.outbox.received();
  return () => {
    state.destroy();
    delete parentElement.__loupeReviewer;
  };
}

function createState(parentElement, data) {
  const root = element("div", "loupe-reviewer");
  root.dataset.view = "gallery";
  // Streamlit keeps the component's stylesheet beside it in the same element: only the old view goes.
  for (const old of parentElement.querySelectorAll(":scope > .loupe-reviewer")) old.remove();
  parentElement.append(root);
  const state = { token: data.queue_token };
  state.outbox = new Outbox(STORE_PREFIX + data.channel, () => {
    root.dataset.pending = String(state.outbox.events.length);
  });
  root.dataset.pending = String(state.outbox.events.length);
  state.view = new Reviewer(root, state.outbox);
  state.view.render();
  const onKey = (event) => {
    if (event.defaultPrevented || event.repeat || event.altKey || event.ctrlKey || event.metaKey) return;
    if (typingInto(event.target)) return;
    if (state.view.onKey(event)) event.preventDefault();
  };
  const resend = setInterval(() => {
    // A report whose reply never came (its rerun was interrupted) is sent again too.
    const waiting = state.outbox.waiting || state.outbox.inFlight;
    if (waiting && Date.now() - state.outbox.lastSentAt > RESEND_AFTER_MS) state.outbox.flush();
  }, 500);
  document.addEventListener("keydown", onKey);
  state.destroy = () => {
    document.removeEventListener("keydown", onKey);
    clearInterval(resend);
    clearTimeout(state.view.later);
  };
  return state;
}
