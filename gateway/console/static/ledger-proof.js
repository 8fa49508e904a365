// FlexGate ledger checks in the browser: record hashes, Merkle inclusion proofs (RFC 9162),
// checkpoint signatures (Ed25519). Everything that depends on the ledger format is in this
// one file (see docs/audit.md); record.js and verify.js only call it.
"use strict";
(function (global) {
  const FORMAT = {
    // Ledger format v1 (docs/audit.md): each record hash starts with this line. The page may
    // set it from the server (`useFormat`) while a ledger of the format before v1 (no prefix)
    // is still being served.
    recordDomain: "flexgate-record/v1\n",
    // The checkpoint signature's domain-separation prefix.
    checkpointDomain: "flexgate-checkpoint/v1\n",
    // Hash of the first record's predecessor.
    genesis: "0".repeat(64),
  };
  const enc = new TextEncoder();

  function hasCrypto() {
    return !!(global.crypto && global.crypto.subtle);
  }

  function hex(bytes) {
    return Array.from(new Uint8Array(bytes), (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function unhex(text) {
    if (typeof text !== "string" || text.length % 2 || /[^0-9a-f]/.test(text)) {
      throw new Error("not a hex string: " + String(text).slice(0, 20));
    }
    const out = new Uint8Array(text.length / 2);
    for (let i = 0; i < out.length; i++) out[i] = parseInt(text.substr(i * 2, 2), 16);
    return out;
  }

  function concat(...parts) {
    const n = parts.reduce((a, p) => a + p.length, 0);
    const out = new Uint8Array(n);
    let at = 0;
    for (const p of parts) { out.set(p, at); at += p.length; }
    return out;
  }

  async function sha256(bytes) {
    return new Uint8Array(await global.crypto.subtle.digest("SHA-256", bytes));
  }

  // Canonical JSON: sorted keys, no whitespace, UTF-8. Strings are escaped as JSON.stringify
  // does (the same escapes as the server's encoder); numbers as ECMAScript writes them.
  function canonicalJson(value) {
    if (value === null || typeof value === "boolean") return JSON.stringify(value);
    if (typeof value === "number") {
      if (!Number.isFinite(value)) throw new Error("non-finite number");
      return Object.is(value, -0) ? "0" : String(value);
    }
    if (typeof value === "string") return JSON.stringify(value);
    if (Array.isArray(value)) return "[" + value.map(canonicalJson).join(",") + "]";
    if (typeof value === "object") {
      const keys = Object.keys(value).sort();
      return "{" + keys.map((k) => JSON.stringify(k) + ":" + canonicalJson(value[k])).join(",") + "}";
    }
    throw new Error("cannot encode " + typeof value);
  }

  function useFormat(options) {
    if (options && typeof options.recordDomain === "string") FORMAT.recordDomain = options.recordDomain;
  }

  // hash = SHA-256(record domain line || prev_hash as ASCII hex || canonical JSON of the
  // record body); canonical JSON is RFC 8785 (JCS). The body's
  // members in canonical (sorted) order are at, id, kind, payload, principal, seq. When the
  // server sends the payload exactly as stored (`payload_text`, the bytes that were hashed),
  // it is used as is; otherwise the parsed payload is re-encoded canonically.
  function recordBody(r) {
    const payload = typeof r.payload_text === "string" ? r.payload_text : canonicalJson(r.payload);
    return "{" + '"at":' + JSON.stringify(r.at) + ',"id":' + JSON.stringify(r.id) +
      ',"kind":' + JSON.stringify(r.kind) + ',"payload":' + payload +
      ',"principal":' + (r.principal === null ? "null" : JSON.stringify(r.principal)) +
      ',"seq":' + canonicalJson(r.seq) + "}";
  }

  async function recordHash(r) {
    return hex(await sha256(enc.encode(FORMAT.recordDomain + r.prev_hash + recordBody(r))));
  }

  async function leafHash(recordHashHex) {
    return sha256(concat(new Uint8Array([0]), unhex(recordHashHex)));
  }

  async function nodeHash(left, right) {
    return sha256(concat(new Uint8Array([1]), left, right));
  }

  // RFC 9162 §2.1.3.2: the root an inclusion proof leads to, or null if the proof is malformed.
  async function rootFromInclusion(index, size, leaf, path) {
    if (index >= size) return null;
    let fn = index, sn = size - 1, r = leaf;
    for (const p of path) {
      if (sn === 0) return null;
      const node = unhex(p);
      if ((fn & 1) || fn === sn) {
        r = await nodeHash(node, r);
        if (!(fn & 1)) {
          while (!(fn & 1) && fn !== 0) { fn = Math.floor(fn / 2); sn = Math.floor(sn / 2); }
        }
      } else {
        r = await nodeHash(r, node);
      }
      fn = Math.floor(fn / 2); sn = Math.floor(sn / 2);
    }
    return sn === 0 ? r : null;
  }

  // The Merkle root of a growing list of leaves, O(log n) state (for the whole-chain check).
  class Frontier {
    constructor() { this.size = 0; this.nodes = []; }
    async append(leaf) {
      let digest = leaf, s = this.size;
      while (s & 1) { digest = await nodeHash(this.nodes.pop(), digest); s = Math.floor(s / 2); }
      this.nodes.push(digest);
      this.size += 1;
    }
    async root() {
      if (!this.nodes.length) return sha256(new Uint8Array(0));
      let digest = this.nodes[this.nodes.length - 1];
      for (let i = this.nodes.length - 2; i >= 0; i--) digest = await nodeHash(this.nodes[i], digest);
      return digest;
    }
  }

  function checkpointMessage(cp) {
    const body = { size: cp.size, root: cp.root, at: cp.at, key_id: cp.key_id };
    return concat(enc.encode(FORMAT.checkpointDomain), enc.encode(canonicalJson(body)));
  }

  // {ok, reason}: the checkpoint's key id is the SHA-256 of the raw public key and the
  // Ed25519 signature over the checkpoint message holds.
  async function checkCheckpoint(cp, spkiB64) {
    if (!spkiB64) return { ok: false, reason: "the server sent no public key for this checkpoint's signing key" };
    const der = Uint8Array.from(atob(spkiB64), (c) => c.charCodeAt(0));
    const raw = der.slice(der.length - 32);
    if (hex(await sha256(raw)) !== cp.key_id) {
      return { ok: false, reason: "the public key does not match the checkpoint's key id" };
    }
    let key;
    try {
      key = await global.crypto.subtle.importKey("spki", der, { name: "Ed25519" }, false, ["verify"]);
    } catch (e) {
      return { ok: false, reason: "this browser cannot check Ed25519 signatures (" + e.name + "); use `flexgate audit proof` offline" };
    }
    const ok = await global.crypto.subtle.verify({ name: "Ed25519" }, key, unhex(cp.signature), checkpointMessage(cp));
    return ok ? { ok: true } : { ok: false, reason: "the checkpoint's signature is invalid (forged or altered)" };
  }

  global.document.documentElement.classList.add("js");
  global.FlexgateLedger = {
    FORMAT, useFormat, hasCrypto, hex, unhex, sha256, canonicalJson, recordBody, recordHash, leafHash, nodeHash,
    rootFromInclusion, Frontier, checkpointMessage, checkCheckpoint,
  };
})(window);
