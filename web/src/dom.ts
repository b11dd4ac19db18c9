// DOM helpers. Every element is built with the DOM API and every text set
// as textContent: nothing a device sends is ever parsed as HTML, and the
// page needs no inline script or style (the service's Content-Security-Policy
// allows neither).

type Attrs = Record<string, string | number | boolean | undefined>;
type Child = Node | string | null | undefined | false;

/** An element with attributes (`false`/`undefined` left out) and children. */
export function h<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  attrs: Attrs = {},
  ...children: Child[]
): HTMLElementTagNameMap[K] {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === false) continue;
    element.setAttribute(name, value === true ? "" : String(value));
  }
  append(element, ...children);
  return element;
}

export function append(parent: Node, ...children: Child[]): void {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    parent.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
  }
}

/** A form control with its label (every control has one). */
export function field(label: string, control: HTMLElement, hint?: string): HTMLLabelElement {
  return h("label", { class: "field" }, h("span", {}, label), control, hint && h("small", {}, hint));
}

/** A visible error message, announced at once (role="alert"). */
export function alertBox(message: string): HTMLParagraphElement {
  return h("p", { role: "alert", class: "error" }, message);
}

/** A quiet note, e.g. "no state yet". */
export function note(message: string): HTMLParagraphElement {
  return h("p", { class: "note" }, message);
}

/** A table inside a box that scrolls sideways on narrow screens. */
export function table(caption: string, head: string[], rows: Node[]): HTMLDivElement {
  return h(
    "div",
    { class: "scroll", tabindex: 0, role: "region", "aria-label": caption },
    h(
      "table",
      {},
      h("caption", {}, caption),
      h("thead", {}, h("tr", {}, ...head.map((name) => h("th", { scope: "col" }, name)))),
      h("tbody", {}, ...rows),
    ),
  );
}

const dateTime = new Intl.DateTimeFormat(undefined, {
  dateStyle: "short",
  timeStyle: "medium",
});

/** `date` as a `<time>`: relative ("5 s ago") with the absolute time as its title. */
export function timeAgo(date: Date | undefined, now = Date.now()): Node {
  if (!date) return document.createTextNode("—");
  const seconds = Math.max(0, Math.round((now - date.getTime()) / 1000));
  const text =
    seconds < 60
      ? `${seconds} s ago`
      : seconds < 3600
        ? `${Math.floor(seconds / 60)} min ago`
        : seconds < 86_400
          ? `${Math.floor(seconds / 3600)} h ago`
          : dateTime.format(date);
  return h("time", { datetime: date.toISOString(), title: dateTime.format(date) }, text);
}

export function formatTime(date: Date | undefined): string {
  return date ? dateTime.format(date) : "—";
}

/** A number for people: 6 significant digits at most (exact figures are in the tables' data-value). */
export function formatNumber(value: number): string {
  return Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(6)));
}

/** JSON on one line, cut to `max` characters. */
export function compactJson(value: unknown, max = 200): string {
  const text = JSON.stringify(value) ?? "null";
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}
