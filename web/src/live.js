// OTAForge live regions.
//
// A page that loads this script keeps every element marked `data-live` (each with an id)
// current: every few seconds, while the tab is visible, it asks the server for the same
// page again and swaps in each marked element's fresh copy. The server renders the page
// one way only, so what updates in place is exactly what a reload would show.
//
// <body data-live-every="3000"> sets the interval (milliseconds, default 3000). An element
// that holds the focus is left alone until the focus moves on, so a form being filled in
// is never replaced under the user. Polling stops when the session ends (the server sends
// the sign-in page) or the page is gone.
(function () {
  "use strict";
  const every = Math.max(1000, parseInt(document.body.dataset.liveEvery, 10) || 3000);
  let timer = null;
  let stopped = false;

  function regions(root) {
    return Array.from(root.querySelectorAll("[data-live][id]"));
  }

  function swap(fresh) {
    let changed = 0;
    for (const old of regions(document)) {
      const next = fresh.getElementById(old.id);
      if (!next || next.innerHTML === old.innerHTML) continue;
      if (old.contains(document.activeElement) && document.activeElement !== document.body) continue;
      old.replaceWith(document.importNode(next, true));
      changed += 1;
    }
    if (changed) document.dispatchEvent(new CustomEvent("otaforge:live", { detail: { changed } }));
  }

  async function tick() {
    timer = null;
    if (stopped) return;
    if (!document.hidden) {
      try {
        const res = await fetch(location.href, {
          headers: { Accept: "text/html" },
          credentials: "same-origin",
          cache: "no-store",
        });
        const landed = new URL(res.url, location.href);
        if (res.status === 401 || res.status === 403 || landed.pathname === "/login") {
          stopped = true;
          return;
        }
        if (res.ok) swap(new DOMParser().parseFromString(await res.text(), "text/html"));
      } catch (_) {
        // The server is restarting or the network dropped: try again at the next tick.
      }
    }
    schedule();
  }

  function schedule() {
    if (!stopped && timer === null) timer = setTimeout(tick, every);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && timer === null) tick();
  });
  if (regions(document).length) schedule();
})();
