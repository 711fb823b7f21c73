// OTAForge: flashing the setup firmware from the browser with ESP Web Tools
// (esp-web-tools from the npm lockfile, bundled here; no CDN). Loaded only by a workspace
// that shows a setup build with an install manifest. The page marks the place with
// <esp-web-install-button manifest="...">; where the browser has no Web Serial the page's
// #no-web-serial note is shown and the esptool steps beside it stay the way to flash.
import "esp-web-tools/dist/install-button.js";

function init() {
  const note = document.getElementById("no-web-serial");
  if (note && !("serial" in navigator)) note.hidden = false;
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
