// OTAForge uploads with progress.
//
// A <form data-upload> (multipart, with a <progress> inside) still works as a plain form.
// When this script runs, submitting it sends the same fields with XMLHttpRequest, so the
// <progress> shows how much of the file has gone, and the page then goes where the server
// sent it (its redirect after the POST), or shows the server's answer page when it refused.
(function () {
  "use strict";
  document.querySelectorAll("form[data-upload]").forEach((form) => {
    const bar = form.querySelector("progress");
    form.addEventListener("submit", (event) => {
      if (!window.FormData || !window.XMLHttpRequest) return;
      event.preventDefault();
      const xhr = new XMLHttpRequest();
      xhr.open("POST", form.action);
      const buttons = form.querySelectorAll("button");
      buttons.forEach((b) => (b.disabled = true));
      if (bar) {
        bar.hidden = false;
        bar.value = 0;
      }
      xhr.upload.addEventListener("progress", (e) => {
        if (bar && e.lengthComputable) bar.value = Math.round((e.loaded / e.total) * 100);
      });
      xhr.addEventListener("load", () => {
        if (xhr.status < 400 && xhr.responseURL && xhr.responseURL !== form.action) {
          location.assign(xhr.responseURL);
          return;
        }
        document.open();
        document.write(xhr.responseText);
        document.close();
      });
      xhr.addEventListener("error", () => {
        buttons.forEach((b) => (b.disabled = false));
        if (bar) bar.hidden = true;
        form.insertAdjacentHTML("beforeend", '<p class="flash flash-error" role="alert">The upload did not reach the server; try again.</p>');
      });
      xhr.send(new FormData(form));
    });
  });
})();
