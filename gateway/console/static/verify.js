// The verify page: recompute the whole chain and the latest checkpoint in the browser.
"use strict";
(function () {
  const L = window.FlexgateLedger;
  const config = JSON.parse(document.getElementById("verify-config").textContent);
  L.useFormat({ recordDomain: config.record_domain });
  const button = document.getElementById("verify-start");
  const bar = document.getElementById("verify-progress");
  const count = document.getElementById("verify-count");
  const out = document.getElementById("verify-result");
  function progress(done) {
    bar.max = Math.max(done, config.head_seq || 0, 1); bar.value = done;
    count.textContent = done + " of " + Math.max(done, config.head_seq || 0) + " records checked";
  }
  function finish(ok, text) { out.className = "result " + (ok ? "ok" : "bad"); out.textContent = text; button.disabled = false; }

  async function run() {
    button.disabled = true;
    out.className = "result pending"; out.textContent = "Verifying…";
    if (!L.hasCrypto()) return finish(false, "Not checked: this browser offers cryptography only on secure (https) pages.");
    const cp = config.checkpoint;
    const frontier = new L.Frontier();
    let prev = L.FORMAT.genesis, expected = 1, after = 0, rootChecked = false;
    for (;;) {
      const resp = await fetch(config.records_url + "?after=" + after + "&limit=" + config.page, { credentials: "same-origin", headers: { accept: "application/json" } });
      if (!resp.ok) return finish(false, "Stopped: the server answered " + resp.status + " while reading records after seq " + after + ".");
      const page = await resp.json();
      for (const r of page.records) {
        progress(expected - 1);
        if (r.seq !== expected) return finish(false, "Failed at seq " + expected + ": the record is missing (next one is " + r.seq + ").");
        if (r.prev_hash !== prev) return finish(false, "Failed at seq " + r.seq + ": its prev_hash is not the previous record's hash (the chain is broken).");
        const h = await L.recordHash(r);
        if (h !== r.hash) return finish(false, "Failed at seq " + r.seq + ": its contents do not match its hash (the record was altered).");
        await frontier.append(await L.leafHash(r.hash));
        if (cp && frontier.size === cp.size) {
          if (L.hex(await frontier.root()) !== cp.root) return finish(false, "Failed at seq " + cp.size + ": the records do not match the signed checkpoint's Merkle root.");
          rootChecked = true;
        }
        prev = r.hash; expected += 1;
        if (expected % 100 === 0) progress(expected - 1);
      }
      after = expected - 1;
      progress(after);
      if (page.next_after === null) break;
    }
    if (!cp) return finish(true, "Verified " + (expected - 1) + " records (chain only: there is no signed checkpoint yet).");
    if (!rootChecked) return finish(false, "Failed: the signed checkpoint covers " + cp.size + " records but only " + (expected - 1) + " exist (records were removed).");
    const sig = await L.checkCheckpoint(cp, config.public_key_spki_b64);
    if (!sig.ok) return finish(false, "Failed: " + sig.reason + ".");
    finish(true, "Verified: " + (expected - 1) + " records form an unbroken chain and match the signed checkpoint of " + cp.size + " records.");
  }
  button.addEventListener("click", () => { run().catch((e) => finish(false, "Stopped: " + e.message)); });
})();
