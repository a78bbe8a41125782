// What Loupe's components share: small DOM helpers, and the outbox of events not yet acknowledged
// by Python. Every event has a unique id (this mount's client id + a sequence number), is kept in
// sessionStorage and is resent until Python acknowledges it, so a rerun, a reconnect or a reload
// neither loses nor doubles one. Python prepends this file to each component's own script.

const RESEND_AFTER_MS = 1500;

function randomId() {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function typingInto(target) {
  if (!target || !(target instanceof Element)) return false;
  if (target.isContentEditable) return true;
  return ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName);
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Events not yet acknowledged by Python, in the order they happened.
class Outbox {
  constructor(storeKey, onChange) {
    this.storeKey = storeKey;
    this.client = randomId();
    this.sequence = 0;
    this.attempt = 0;
    this.lastSentAt = 0;
    this.onChange = onChange;
    this.send = null;
    this.current = null;
    this.missing = [];
    // What a component sends beside its events (the labeller's "find similar" request).
    this.extra = {};
    this.inFlight = false;
    this.wanted = false;
    let saved = [];
    try {
      saved = JSON.parse(sessionStorage.getItem(this.storeKey) || "[]");
    } catch (error) {
      saved = [];
    }
    this.events = Array.isArray(saved) ? saved : [];
  }

  add(event) {
    this.sequence += 1;
    const full = { ...event, id: `${this.client}-${this.sequence}`, at: Date.now() };
    this.events.push(full);
    this.save();
    return full;
  }

  acknowledge(ids) {
    if (!ids || !ids.length || !this.events.length) return;
    const done = new Set(ids);
    const left = this.events.filter((event) => !done.has(event.id));
    if (left.length !== this.events.length) {
      this.events = left;
      this.save();
    }
  }

  save() {
    try {
      sessionStorage.setItem(this.storeKey, JSON.stringify(this.events));
    } catch (error) {
      // Storage full or denied: the events are still held in memory and resent from there.
    }
    this.onChange();
  }

  // One report in flight at a time: each report reruns the page, and a new one would interrupt
  // the rerun under way, so at 15 keys a second no rerun would finish. Events wait and go together.
  request(current) {
    this.current = current;
    if (this.inFlight && Date.now() - this.lastSentAt < RESEND_AFTER_MS) this.wanted = true;
    else this.flush();
  }

  received() {
    this.inFlight = false;
    if (this.waiting || this.missing.length) this.flush();
  }

  // Events, a report asked for, or a request beside the events that Python has not yet seen.
  get waiting() {
    return Boolean(this.events.length || this.wanted || Object.keys(this.extra).length);
  }

  flush() {
    if (!this.send) return;
    this.attempt += 1;
    this.lastSentAt = Date.now();
    this.inFlight = true;
    this.wanted = false;
    this.send("outbox", {
      ...this.extra, events: this.events, current: this.current, client: this.client, missing: this.missing,
      attempt: this.attempt,
    });
  }

  get pending() {
    return this.events.length;
  }
}
