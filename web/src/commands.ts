// The device page's commands: a form for SendCommand that shows the
// device's reply, and the device's persistent commands (ListCommands) with
// their states, when it has any.

import { toJson } from "@bufbuild/protobuf";
import { durationFromMs, timestampDate, ValueSchema } from "@bufbuild/protobuf/wkt";
import { aborted, describe, hub } from "./api.js";
import { parseObject } from "./calc.js";
import { alertBox, compactJson, field, formatTime, h, table } from "./dom.js";
import {
  CommandState,
  CommandStatus,
  SendCommandResponseSchema,
  type Command,
} from "./gen/devicehub/v1/devicehub_pb.js";

/** Persistent commands listed: the newest this many. */
const COMMANDS_PAGE_SIZE = 20;
/** How often the list is refreshed while a command in it is still active. */
const ACTIVE_REFRESH_MS = 3000;

function stateName(state: CommandState): string {
  return (CommandState[state] ?? String(state)).toLowerCase();
}

function commandRow(command: Command): HTMLTableRowElement {
  const reply = command.reply;
  const replyText = reply
    ? `${reply.status === CommandStatus.OK ? "ok" : "error"}${reply.message ? `: ${reply.message}` : ""}${
        reply.result ? ` ${compactJson(toJson(ValueSchema, reply.result), 80)}` : ""
      }`
    : "—";
  return h(
    "tr",
    { "data-state": stateName(command.state) },
    h("td", {}, command.command),
    h("td", {}, stateName(command.state)),
    h("td", {}, formatTime(command.createTime && timestampDate(command.createTime))),
    h("td", {}, String(command.attempts)),
    h("td", { class: "mono" }, replyText),
  );
}

export function commandsSection(deviceId: string, signal: AbortSignal): HTMLElement {
  const name = h("input", { name: "command", value: "PING", required: true, autocomplete: "off" });
  const params = h("textarea", { name: "params", rows: 3, spellcheck: "false" }, "{}");
  const timeout = h("input", { name: "reply_timeout", type: "number", min: 0, max: 60, value: 5 });
  const ttl = h("input", { name: "ttl", type: "number", min: 0, placeholder: "not persistent" });
  const reply = h("pre", { id: "command-reply", role: "status", "aria-live": "polite" });
  const form = h(
    "form",
    { id: "command-form", class: "stack" },
    field("Command", name),
    field("Parameters (JSON object)", params),
    field("Wait for the reply (seconds, 0: do not wait)", timeout),
    field("Keep for (seconds; makes it persistent)", ttl),
    h("button", { type: "submit" }, "Send command"),
  );
  const persistent = h("div", { id: "persistent-commands" });
  const section = h(
    "section",
    { "aria-labelledby": "commands-title", id: "commands" },
    h("h2", { id: "commands-title" }, "Commands"),
    form,
    reply,
    persistent,
  );
  let refresh = 0;

  async function list(): Promise<void> {
    clearTimeout(refresh);
    try {
      const response = await hub.listCommands({ deviceId, pageSize: COMMANDS_PAGE_SIZE }, { signal });
      const commands = response.commands;
      persistent.replaceChildren(
        ...(commands.length === 0
          ? []
          : [
              h("h3", {}, "Persistent commands"),
              table(
                `persistent commands of ${deviceId}, newest first`,
                ["command", "state", "created", "attempts", "reply"],
                commands.map(commandRow),
              ),
            ]),
      );
      const active = commands.some(
        (c) => c.state === CommandState.QUEUED || c.state === CommandState.SENT,
      );
      if (active && !signal.aborted) refresh = window.setTimeout(() => void list(), ACTIVE_REFRESH_MS);
    } catch (error) {
      if (aborted(error, signal)) return;
      persistent.replaceChildren(alertBox(`Persistent commands: ${describe(error)}`));
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    reply.classList.remove("error");
    reply.removeAttribute("role");
    reply.setAttribute("role", "status");
    let request;
    try {
      const seconds = Number(timeout.value || 0);
      const keep = Number(ttl.value || 0);
      request = {
        deviceId,
        command: name.value.trim(),
        payload: { case: "params" as const, value: parseObject(params.value, "Parameters") },
        replyTimeout: seconds > 0 ? durationFromMs(seconds * 1000) : undefined,
        ttl: keep > 0 ? durationFromMs(keep * 1000) : undefined,
      };
    } catch (error) {
      reply.setAttribute("role", "alert");
      reply.classList.add("error");
      reply.textContent = (error as Error).message;
      return;
    }
    reply.textContent = "sending…";
    try {
      const response = await hub.sendCommand(request, { signal });
      reply.textContent = JSON.stringify(toJson(SendCommandResponseSchema, response), null, 2);
      if (request.ttl) void list();
    } catch (error) {
      if (aborted(error, signal)) return;
      reply.setAttribute("role", "alert");
      reply.classList.add("error");
      reply.textContent = describe(error);
    }
  });
  signal.addEventListener("abort", () => clearTimeout(refresh));
  void list();
  return section;
}
