// devicehub in a browser, over gRPC-Web: the newest readings, live ones as
// they arrive (server streaming), and a command with the device's reply.
// The service's address (and a token, with auth) come from the page's query
// string: index.html?service=http://127.0.0.1:50051&token=...
// The service must list this page's origin in --cors-allowed-origins.

import { toJson } from "@bufbuild/protobuf";
import { ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import {
  DeviceHub,
  ReadingSchema,
  SendCommandResponseSchema,
  type Reading,
} from "./gen/devicehub/v1/devicehub_pb.js";

const params = new URLSearchParams(location.search);
const service = params.get("service") ?? "http://127.0.0.1:50051";
const token = params.get("token");
const bearer: Interceptor = (next) => async (req) => {
  if (token) req.header.set("authorization", `Bearer ${token}`);
  return next(req);
};
const client = createClient(
  DeviceHub,
  createGrpcWebTransport({ baseUrl: service, interceptors: [bearer] }),
);

const $ = (id: string) => document.getElementById(id)!;
const MAX_LIVE = 50;

function line(reading: Reading): HTMLLIElement {
  const li = document.createElement("li");
  li.dataset.seq = String(reading.seq);
  const json = toJson(ReadingSchema, reading) as { json?: unknown };
  const body = json.json !== undefined ? JSON.stringify(json.json) : `${reading.payload.length} bytes`;
  li.textContent = `${reading.seq} ${reading.deviceId} ${reading.topic} ${body}`;
  return li;
}

async function newest(): Promise<void> {
  const page = await client.listReadings({ pageSize: 10 });
  $("newest").replaceChildren(...page.readings.map(line));
}

async function live(): Promise<void> {
  // Resume after the last reading shown when the stream drops.
  let afterSeq: bigint | undefined;
  for (;;) {
    try {
      $("status").textContent = "live";
      for await (const message of client.watchReadings({ afterSeq })) {
        if (message.event.case !== "reading") continue;
        afterSeq = message.event.value.seq;
        $("live").prepend(line(message.event.value));
        while ($("live").childElementCount > MAX_LIVE) $("live").lastElementChild!.remove();
      }
    } catch (error) {
      $("status").textContent = `reconnecting: ${ConnectError.from(error).message}`;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

$("command").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("reply").textContent = "…";
  try {
    const response = await client.sendCommand({
      deviceId: ($("device") as HTMLInputElement).value,
      command: ($("name") as HTMLInputElement).value,
      replyTimeout: { seconds: 5n },
    });
    $("reply").textContent = JSON.stringify(toJson(SendCommandResponseSchema, response), null, 2);
  } catch (error) {
    $("reply").textContent = `error: ${ConnectError.from(error).message}`;
  }
});

newest().catch((error) => ($("status").textContent = `error: ${ConnectError.from(error).message}`));
void live();
