// Decodes Sparkplug B payloads with Eclipse Tahu's JavaScript library (npm sparkplug-payload),
// as an independent check of the gateway's Python encoder (tests/unit/test_sparkplug.py).
//
// stdin:  JSON [{"topic": "spBv1.0/...", "payload": "<base64>"}, ...], in publishing order
// stdout: JSON [{"topic": ..., "decoded": <decodePayload()>, "raw": <the protobuf fields>}, ...]
//
// Sparkplug leaves the datatype out of DATA metrics (they carry only an alias), and
// decodePayload() is stateless: it reads a value by the metric's own datatype. So this script
// does what a host application does: it remembers each alias's datatype from the BIRTHs and
// writes it into a DATA metric that lacks one before calling decodePayload(). "raw" is the
// plain protobuf decode, so a test can see which value field (int_value, long_value...) was set.
//
// 64-bit integers (Long objects) are printed as decimal strings, bytes as base64.
"use strict";

const Long = require("long");
const sparkplug = require("sparkplug-payload").get("spBv1.0");
const proto = require("sparkplug-payload/lib/sparkplugPayloadProto");

const Payload = proto.org.eclipse.tahu.protobuf.Payload;

function plain(key, value) {
  if (Long.isLong(value)) return value.toString();
  if (value instanceof Uint8Array) return Buffer.from(value).toString("base64");
  // A Buffer has already become {type: "Buffer", data: [...]} through its toJSON().
  if (value && value.type === "Buffer" && Array.isArray(value.data)) {
    return Buffer.from(value.data).toString("base64");
  }
  return value;
}

function main(input) {
  const messages = JSON.parse(input);
  const types = new Map(); // "<group>/<edge>" -> Map(alias string -> datatype)
  const out = [];
  for (const { topic, payload } of messages) {
    const parts = topic.split("/");
    const node = `${parts[1]}/${parts[3]}`;
    const kind = parts[2];
    if (!types.has(node)) types.set(node, new Map());
    const known = types.get(node);
    let bytes = Buffer.from(payload, "base64");
    const message = Payload.decode(bytes);
    const raw = Payload.toObject(message, { longs: String, bytes: String, oneofs: true });
    if (kind === "NBIRTH" || kind === "DBIRTH") {
      for (const metric of message.metrics) {
        if (metric.alias != null && metric.datatype != null) {
          known.set(metric.alias.toString(), metric.datatype);
        }
      }
    } else {
      let filled = false;
      for (const metric of message.metrics) {
        if (!metric.datatype && metric.alias != null && known.has(metric.alias.toString())) {
          metric.datatype = known.get(metric.alias.toString());
          filled = true;
        }
      }
      if (filled) bytes = Payload.encode(message).finish();
    }
    out.push({ topic, decoded: sparkplug.decodePayload(bytes), raw });
  }
  return JSON.stringify(out, plain);
}

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => {
  input += chunk;
});
process.stdin.on("end", () => {
  process.stdout.write(main(input));
});
