// The one client of the DeviceHub service: gRPC-Web to the page's own
// origin (the service serves this page, so no CORS is involved), with the
// token from the settings area sent as `authorization: Bearer`.

import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { DeviceHub } from "./gen/devicehub/v1/devicehub_pb.js";

// sessionStorage, not localStorage: the token goes when the tab closes, and
// never into the URL (history, logs, Referer).
const TOKEN_KEY = "devicehub.token";

export function token(): string {
  try {
    return sessionStorage.getItem(TOKEN_KEY) ?? "";
  } catch {
    return ""; // storage disabled: no token
  }
}

export function setToken(value: string): void {
  try {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  } catch {
    // storage disabled: the token cannot be kept
  }
}

const bearer: Interceptor = (next) => async (req) => {
  const current = token();
  if (current) req.header.set("authorization", `Bearer ${current}`);
  return next(req);
};

export const hub: Client<typeof DeviceHub> = createClient(
  DeviceHub,
  createGrpcWebTransport({ baseUrl: location.origin, interceptors: [bearer] }),
);

const CODE_NAMES: Record<number, string> = {
  [Code.Canceled]: "CANCELLED",
  [Code.Unknown]: "UNKNOWN",
  [Code.InvalidArgument]: "INVALID_ARGUMENT",
  [Code.DeadlineExceeded]: "DEADLINE_EXCEEDED",
  [Code.NotFound]: "NOT_FOUND",
  [Code.AlreadyExists]: "ALREADY_EXISTS",
  [Code.PermissionDenied]: "PERMISSION_DENIED",
  [Code.ResourceExhausted]: "RESOURCE_EXHAUSTED",
  [Code.FailedPrecondition]: "FAILED_PRECONDITION",
  [Code.Aborted]: "ABORTED",
  [Code.OutOfRange]: "OUT_OF_RANGE",
  [Code.Unimplemented]: "UNIMPLEMENTED",
  [Code.Internal]: "INTERNAL",
  [Code.Unavailable]: "UNAVAILABLE",
  [Code.DataLoss]: "DATA_LOSS",
  [Code.Unauthenticated]: "UNAUTHENTICATED",
};

export function codeOf(error: unknown): Code {
  return ConnectError.from(error).code;
}

/** What to tell a person about a failed call. */
export function describe(error: unknown): string {
  const e = ConnectError.from(error);
  const name = CODE_NAMES[e.code] ?? `code ${e.code}`;
  switch (e.code) {
    case Code.Unauthenticated:
      return `${name}: ${e.rawMessage}. Enter a valid token under “Token” at the top.`;
    case Code.PermissionDenied:
      return `${name}: ${e.rawMessage}. The token lacks the scope for this.`;
    default:
      return `${name}: ${e.rawMessage}`;
  }
}

/** Whether `error` is the page's own abort (leaving a page), not a failure. */
export function aborted(error: unknown, signal: AbortSignal): boolean {
  return signal.aborted || ConnectError.from(error).code === Code.Canceled;
}
