// Validates GLB/glTF assets with the Khronos glTF validator for tests/gltf_validator.py.
// stdin: assets one after another, each as a 4-byte little-endian length and its bytes.
// stdout: one JSON validation report per asset, one per line, in the same order.
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const validator = require("gltf-validator");

const input = readFileSync(0);
let offset = 0;
const reports = [];
while (offset + 4 <= input.length) {
  const length = input.readUInt32LE(offset);
  const asset = new Uint8Array(input.subarray(offset + 4, offset + 4 + length));
  offset += 4 + length;
  try {
    reports.push(await validator.validateBytes(asset, { maxIssues: 1000 }));
  } catch (error) {
    // The validator rejects when it cannot even tell the format: one error, as a report.
    reports.push({ issues: { numErrors: 1, numWarnings: 0, numInfos: 0, numHints: 0,
      messages: [{ code: "UNREADABLE", message: String(error), severity: 0 }] } });
  }
}
for (const report of reports) process.stdout.write(JSON.stringify(report) + "\n");
