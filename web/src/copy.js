// Copy buttons: <button data-copy="#id"> puts that element's text on the clipboard.
document.addEventListener("click", (event) => {
  const button = event.target.closest("button[data-copy]");
  if (!button) return;
  const source = document.querySelector(button.dataset.copy);
  if (!source) return;
  const done = (label) => { button.textContent = label; };
  if (!navigator.clipboard) {
    // No clipboard here (not https): select the text for the user to copy.
    window.getSelection().selectAllChildren(source);
    return done("Selected: press Ctrl+C");
  }
  navigator.clipboard.writeText(source.textContent.trim()).then(
    () => done("Copied"),
    () => { window.getSelection().selectAllChildren(source); done("Selected: press Ctrl+C"); },
  );
});
