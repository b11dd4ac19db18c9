// The device page's state: desired, reported, delta and version
// (GetDeviceState), and an editor that changes desired with a JSON merge
// patch against the version shown (UpdateDesiredState with
// expected_version: a change made meanwhile is ABORTED, not overwritten).

import { Code } from "@connectrpc/connect";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { aborted, codeOf, describe, hub } from "./api.js";
import { parseObject } from "./calc.js";
import { alertBox, field, formatTime, h, note } from "./dom.js";
import type { DeviceState } from "./gen/devicehub/v1/devicehub_pb.js";

function json(title: string, value: unknown, updated?: Date): HTMLElement {
  return h(
    "div",
    { class: "state-side" },
    h("h3", {}, title),
    updated && h("p", { class: "note" }, `changed ${formatTime(updated)}`),
    h("pre", { "data-side": title }, JSON.stringify(value ?? {}, null, 2)),
  );
}

export function stateSection(deviceId: string, signal: AbortSignal): HTMLElement {
  const view = h("div", { id: "state-view" });
  const patch = h("textarea", { name: "patch", rows: 4, spellcheck: "false" }, "{}");
  const expected = h("input", { name: "expected_version", type: "number", min: 0, value: 0 });
  const outcome = h("div", { "aria-live": "polite" });
  const form = h(
    "form",
    { id: "desired-form", class: "stack" },
    field("Change desired (JSON merge patch: null deletes a key)", patch),
    field("Based on version (0: whatever the current one)", expected),
    h("button", { type: "submit" }, "Update desired"),
  );
  const reload = h("button", { type: "button" }, "Reload state");
  const section = h(
    "section",
    { "aria-labelledby": "state-title", id: "state" },
    h("h2", { id: "state-title" }, "State"),
    view,
    h("div", { class: "buttons" }, reload),
    form,
    outcome,
  );

  function show(state: DeviceState): void {
    section.dataset.version = String(state.version);
    expected.value = String(state.version);
    view.replaceChildren(
      h("p", {}, `version ${state.version}`),
      h(
        "div",
        { class: "state-grid" },
        json("desired", state.desired, state.desiredUpdateTime && timestampDate(state.desiredUpdateTime)),
        json("reported", state.reported, state.reportedUpdateTime && timestampDate(state.reportedUpdateTime)),
        json("delta", state.delta),
      ),
    );
  }

  async function load(): Promise<void> {
    try {
      const response = await hub.getDeviceState({ deviceId }, { signal });
      if (response.state) show(response.state);
    } catch (error) {
      if (aborted(error, signal)) return;
      if (codeOf(error) === Code.NotFound) {
        // Nothing desired and nothing reported yet: not an error.
        section.dataset.version = "0";
        expected.value = "0";
        view.replaceChildren(note("No state yet: nothing desired, nothing reported."));
        return;
      }
      view.replaceChildren(alertBox(`State: ${describe(error)}`));
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    outcome.replaceChildren();
    let request;
    try {
      request = {
        deviceId,
        patch: parseObject(patch.value, "The patch"),
        expectedVersion: BigInt(Math.max(0, Math.trunc(Number(expected.value || 0)))),
      };
    } catch (error) {
      outcome.replaceChildren(alertBox((error as Error).message));
      return;
    }
    try {
      const response = await hub.updateDesiredState(request, { signal });
      if (response.state) show(response.state);
      outcome.replaceChildren(note(`Desired updated: version ${response.state?.version ?? "?"}.`));
    } catch (error) {
      if (aborted(error, signal)) return;
      const message =
        codeOf(error) === Code.Aborted
          ? `The state changed since version ${request.expectedVersion}: nothing was updated. Reload the state and try again.`
          : `Update: ${describe(error)}`;
      outcome.replaceChildren(alertBox(message));
    }
  });
  reload.addEventListener("click", () => void load());
  void load();
  return section;
}
