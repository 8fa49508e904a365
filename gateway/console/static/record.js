// The record page: check the record's hash, its inclusion proof and the checkpoint signature.
"use strict";
(async function () {
  const L = window.FlexgateLedger;
  const out = document.getElementById("proof-result");
  const steps = document.getElementById("proof-steps");
  const data = JSON.parse(document.getElementById("check-data").textContent);
  L.useFormat({ recordDomain: data.record_domain });
  function step(ok, text) {
    const li = document.createElement("li");
    li.className = ok ? "ok" : "bad";
    li.textContent = (ok ? "✓ " : "✗ ") + text;
    steps.appendChild(li);
    return ok;
  }
  function finish(ok, text) {
    out.className = "result " + (ok ? "ok" : "bad");
    out.textContent = text;
  }
  if (!L.hasCrypto()) {
    finish(false, "Not checked: this browser offers cryptography only on secure (https) pages. Check it offline with `flexgate audit proof " + data.record.seq + "`.");
    return;
  }
  try {
    const r = data.record, p = data.proof;
    const h = await L.recordHash(r);
    if (data.scoped && h !== r.hash) {
      step(true, "The payload is shown as it concerns your experts, so its hash cannot be recomputed here; the proof below covers the stored hash.");
    } else if (!step(h === r.hash, h === r.hash ? "The record's hash matches its contents." : "The record's contents do not hash to its stored hash (" + h.slice(0, 16) + "… ≠ " + r.hash.slice(0, 16) + "…).")) {
      return finish(false, "Failed: the record was altered after it was written.");
    }
    if (!step(p.record_hash === r.hash, "The proof is for this record.")) return finish(false, "Failed: the proof is for another record.");
    const leaf = await L.leafHash(r.hash);
    const root = await L.rootFromInclusion(p.leaf_index, p.tree_size, leaf, p.path);
    const rootOk = root !== null && L.hex(root) === p.checkpoint.root;
    if (!step(rootOk, rootOk ? "The audit path leads to the checkpoint's root (" + p.tree_size + " records)." : "The audit path does not lead to the checkpoint's root.")) {
      return finish(false, "Failed: the record is not in the signed log as the proof claims.");
    }
    const sig = await L.checkCheckpoint(p.checkpoint, data.public_key_spki_b64);
    if (!step(sig.ok, sig.ok ? "The checkpoint is signed by key " + p.checkpoint.key_id.slice(0, 16) + "…" : sig.reason)) {
      return finish(false, "Failed: " + sig.reason + ".");
    }
    finish(true, "Verified: record " + r.seq + " is in the signed log of " + p.tree_size + " records (checkpoint of " + p.checkpoint.at + ").");
  } catch (e) {
    finish(false, "Failed: the proof could not be checked (" + e.message + ").");
  }
})();
