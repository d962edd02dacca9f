// Known-answer vectors for the request fingerprint (SPEC section 3), computed
// independently of the Python code: Node's crypto and its own JSON, with RFC
// 8785 canonical JSON written from the RFC (keys sorted by UTF-16 code
// units, ECMAScript number serialization, no white space).
//
//   node tests/vectors/fingerprint.mjs   prints the vectors as JSON
import { createHash } from "node:crypto";

function canonical(value) {
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return "[" + value.map(canonical).join(",") + "]";
  const keys = Object.keys(value).sort(); // default sort: UTF-16 code units, as RFC 8785 says
  return "{" + keys.map((k) => JSON.stringify(k) + ":" + canonical(value[k])).join(",") + "}";
}

function fingerprint({ kind, ref, reply_to = null, priority = "next", meta = null, body_hex = "" }) {
  const body = Buffer.from(body_hex, "hex");
  const head = ["1", kind, ref, reply_to ?? "", priority, meta === null ? "" : canonical(meta)]
    .map((part) => Buffer.concat([Buffer.from(part, "utf8"), Buffer.from([0])]));
  const bodyHash = createHash("sha256").update(body).digest();
  return createHash("sha256").update(Buffer.concat([...head, bodyHash])).digest("hex");
}

const cases = [
  { kind: "topic", ref: "general", body_hex: Buffer.from("hi").toString("hex") },
  { kind: "dm", ref: "ab".repeat(32), reply_to: "r-1", priority: "now", meta: { z: 1, a: [true, null, "é"] },
    body_hex: "00ff" },
  { kind: "queue", ref: "jobs", priority: "low", meta: { "€": 1, "\u0080": 2, "a": { "y": 1.5, "b": 1e21 } },
    body_hex: "" },
  { kind: "topic", ref: "*", meta: {}, body_hex: Buffer.from("x".repeat(1000)).toString("hex") },
  { kind: "topic", ref: "ünïcode", reply_to: "", meta: { n: -0.0000001, big: 1.2345678901234567e+300, s: "\u2028\n\"" },
    body_hex: "deadbeef" },
];
console.log(JSON.stringify(cases.map((c) => ({ ...c, fingerprint: fingerprint(c) })), null, 1));
