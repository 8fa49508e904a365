// Copy the newly created key to the clipboard.
"use strict";
(function () {
  document.documentElement.classList.add("js");
  const button = document.getElementById("copy-key");
  const field = document.getElementById(button.dataset.target);
  const status = document.getElementById("copy-status");
  button.addEventListener("click", async () => {
    try {
      if (navigator.clipboard && window.isSecureContext) await navigator.clipboard.writeText(field.value);
      else { field.select(); document.execCommand("copy"); }
      status.textContent = "Copied.";
    } catch (e) {
      field.select();
      status.textContent = "Copy failed: the key is selected, press Ctrl+C.";
    }
  });
})();
