// A device's connection status as people read it: an icon and a word, so
// that it never rests on colour alone.

import { h } from "./dom.js";
import { DeviceStatus } from "./gen/devicehub/v1/devicehub_pb.js";

export function statusWord(status: DeviceStatus): string {
  switch (status) {
    case DeviceStatus.ONLINE:
      return "online";
    case DeviceStatus.OFFLINE:
      return "offline";
    default:
      return "unknown";
  }
}

const ICONS: Record<string, string> = { online: "✔", offline: "✖", unknown: "?" };

/** The status as a badge: icon (hidden from screen readers) and word. */
export function statusBadge(status: DeviceStatus): HTMLSpanElement {
  const word = statusWord(status);
  return h(
    "span",
    { class: `status ${word}`, "data-status": word },
    h("span", { class: "icon", "aria-hidden": "true" }, ICONS[word] ?? "?"),
    ` ${word}`,
  );
}
