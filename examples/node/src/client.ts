// devicehub from Node.js: a TypeScript client over real gRPC (HTTP/2), with
// the code `buf generate` makes from the proto (protobuf-es) and Connect's
// gRPC transport.
//
//   npm ci && (cd ../.. && buf generate)      # once
//   npx tsx src/client.ts list --device-id sim-1
//   npx tsx src/client.ts watch [--device-id sim-1] [--count 10]
//   npx tsx src/client.ts send --device-id sim-1 --command PING [--params '{"ms": 500}'] [--reply-timeout-ms 5000]
//
// Options: --target host:port (DEVICEHUB_GRPC_ADDR, default 127.0.0.1:50051),
// --token JWT (DEVICEHUB_TOKEN), --transport grpc|grpc-web (gRPC-Web is what
// a browser speaks; the same client code runs over either). Output: one JSON
// object a line.
//
// `watch` never loses a reading silently: it remembers the `seq` of the last
// reading it printed and, when the connection drops, reconnects with
// `after_seq` and GAP_POLICY_NOTIFY, so it gets every reading exactly once,
// or a `gap` line naming exactly what it missed.

import { toJson, type JsonObject } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import {
  DeviceHub,
  GapPolicy,
  ReadingSchema,
  SendCommandResponseSchema,
  type Reading,
} from "./gen/devicehub/v1/devicehub_pb.js";

function option(args: string[], name: string, fallback?: string): string | undefined {
  const at = args.indexOf(name);
  return at >= 0 ? args[at + 1] : fallback;
}

function emit(value: unknown): void {
  process.stdout.write(JSON.stringify(value) + "\n");
}

function readingJson(reading: Reading) {
  return toJson(ReadingSchema, reading);
}

// Codes that say the request itself is wrong: retrying cannot help.
const FINAL = new Set([
  Code.InvalidArgument,
  Code.Unauthenticated,
  Code.PermissionDenied,
  Code.NotFound,
  Code.FailedPrecondition,
  Code.OutOfRange,
  Code.Unimplemented,
]);

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

async function main(): Promise<void> {
  const [action, ...args] = process.argv.slice(2);
  const target = option(args, "--target", process.env.DEVICEHUB_GRPC_ADDR ?? "127.0.0.1:50051");
  const token = option(args, "--token", process.env.DEVICEHUB_TOKEN);
  const bearer: Interceptor = (next) => async (req) => {
    if (token) req.header.set("authorization", `Bearer ${token}`);
    return next(req);
  };
  const options = { baseUrl: `http://${target}`, interceptors: [bearer] };
  const transport =
    option(args, "--transport", "grpc") === "grpc-web"
      ? createGrpcWebTransport(options) // fetch, HTTP/1.1, as in a browser
      : createGrpcTransport(options);
  const client = createClient(DeviceHub, transport);
  const deviceId = option(args, "--device-id", "")!;

  switch (action) {
    case "list": {
      // Every matching reading, oldest first, page by page.
      let pageToken = "";
      do {
        const page = await client.listReadings({
          deviceId,
          topicFilter: option(args, "--topic-filter", ""),
          pageSize: Number(option(args, "--page-size", "100")),
          pageToken,
          oldestFirst: true,
        });
        page.readings.forEach((r) => emit(readingJson(r)));
        pageToken = page.nextPageToken;
      } while (pageToken);
      return;
    }
    case "watch": {
      const count = Number(option(args, "--count", "0"));
      let printed = 0;
      let afterSeq: bigint | undefined = undefined;
      for (;;) {
        try {
          const stream = client.watchReadings({
            deviceId,
            topicFilter: option(args, "--topic-filter", ""),
            afterSeq,
            gapPolicy: GapPolicy.NOTIFY,
          });
          for await (const message of stream) {
            if (message.event.case === "reading") {
              emit(readingJson(message.event.value));
              afterSeq = message.event.value.seq;
            } else if (message.event.case === "gap") {
              const gap = message.event.value;
              emit({ gap: { firstSeq: String(gap.firstSeq), lastSeq: String(gap.lastSeq) } });
              afterSeq = gap.lastSeq;
            } else {
              continue; // a kind this client does not know yet
            }
            if (count > 0 && ++printed >= count) return;
          }
        } catch (error) {
          // A request the service refuses stays refused; anything else (a
          // dropped connection shows as UNAVAILABLE, or CANCELED when the
          // HTTP/2 stream is reset, a restart as UNAVAILABLE) is retried.
          if (FINAL.has(ConnectError.from(error).code)) throw error;
        }
        // The stream ended or the connection dropped: resume after the
        // last reading printed (all buffered ones when none was yet).
        afterSeq ??= 0n;
        process.stderr.write(`watch: reconnecting after seq ${afterSeq}\n`);
        await sleep(200);
      }
    }
    case "send": {
      const params = option(args, "--params");
      const timeoutMs = option(args, "--reply-timeout-ms");
      const response = await client.sendCommand({
        deviceId,
        command: option(args, "--command", "")!,
        payload: params ? { case: "params", value: JSON.parse(params) as JsonObject } : { case: undefined },
        replyTimeout: timeoutMs
          ? { seconds: BigInt(Math.floor(Number(timeoutMs) / 1000)), nanos: (Number(timeoutMs) % 1000) * 1e6 }
          : undefined,
      });
      emit(toJson(SendCommandResponseSchema, response));
      return;
    }
    default:
      process.stderr.write("usage: client.ts list|watch|send [options] (see the top of this file)\n");
      process.exit(2);
  }
}

main().catch((error: unknown) => {
  const e = ConnectError.from(error);
  process.stderr.write(`${Code[e.code]}: ${e.rawMessage}\n`);
  process.exit(1);
});
