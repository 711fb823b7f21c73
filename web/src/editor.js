// OTAForge sketch editor.
//
// Progressive enhancement only: every <textarea data-editor="cpp"> is a
// working form field without JavaScript. When this bundle runs, the textarea
// is hidden and a CodeMirror 6 editor is shown in its place; every edit is
// copied back into the textarea, so the surrounding plain HTML form still
// submits the code under the textarea's name.
//
// Public API (window.OTAForgeEditor):
//   showDiagnostics(name, [{line, column, severity, message}])  1-based, as gcc reports
//   clearDiagnostics(name)
//   getValue(name)
//   followLog(url, preElement, onDone, {editor})  poll a build's JSON every 700 ms
//
// Markup hooks (no inline script needed):
//   <pre class="log" data-follow-log="/builds/42/status.json" data-editor-for="sketch">

import { EditorState } from "@codemirror/state";
import {
  EditorView,
  keymap,
  lineNumbers,
  highlightActiveLine,
  highlightActiveLineGutter,
  highlightSpecialChars,
  drawSelection,
} from "@codemirror/view";
import { defaultKeymap, history, historyKeymap, indentWithTab } from "@codemirror/commands";
import {
  bracketMatching,
  indentOnInput,
  syntaxHighlighting,
  defaultHighlightStyle,
} from "@codemirror/language";
import { lintGutter, setDiagnostics } from "@codemirror/lint";
import { cpp } from "@codemirror/lang-cpp";

const POLL_MS = 700;
const FINAL = new Set(["succeeded", "failed"]);

// name -> { view, textarea }
const editors = new Map();

const theme = EditorView.theme({
  "&": { border: "1px solid var(--border, #cbd2d9)", borderRadius: "6px", fontSize: "13px", maxHeight: "75vh", backgroundColor: "#fff" },
  "&.cm-focused": { outline: "2px solid var(--accent, #2563eb)", outlineOffset: "-1px" },
  ".cm-scroller": { fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace", overflow: "auto", lineHeight: "1.5" },
  ".cm-content, .cm-gutter": { minHeight: "24em" },
  ".cm-gutters": { backgroundColor: "#f6f8fa", borderRight: "1px solid #e3e7eb", color: "#59636e" },
});

function labelFor(textarea) {
  if (textarea.getAttribute("aria-label")) return textarea.getAttribute("aria-label");
  if (textarea.labels && textarea.labels.length) return textarea.labels[0].textContent.trim();
  return "Sketch source (C++)";
}

function enhance(textarea) {
  if (textarea.dataset.editorReady) return;
  textarea.dataset.editorReady = "1";
  const name = textarea.name || textarea.id;
  const readOnly = textarea.readOnly || textarea.disabled;

  const view = new EditorView({
    state: EditorState.create({
      doc: textarea.value,
      extensions: [
        lineNumbers(),
        highlightActiveLineGutter(),
        highlightSpecialChars(),
        history(),
        drawSelection(),
        indentOnInput(),
        bracketMatching(),
        highlightActiveLine(),
        syntaxHighlighting(defaultHighlightStyle, { fallback: true }),
        cpp(),
        lintGutter(),
        keymap.of([...defaultKeymap, ...historyKeymap, indentWithTab]),
        EditorState.tabSize.of(2),
        EditorState.readOnly.of(readOnly),
        EditorView.editable.of(!readOnly),
        EditorView.contentAttributes.of({ "aria-label": labelFor(textarea) }),
        theme,
        // Long lines wrap: on a phone the editor never scrolls sideways.
        EditorView.lineWrapping,
        // Keep the real form field current so a plain submit carries the code.
        EditorView.updateListener.of((update) => {
          if (update.docChanged) textarea.value = update.state.doc.toString();
        }),
      ],
    }),
  });

  textarea.insertAdjacentElement("afterend", view.dom);
  textarea.style.display = "none";
  textarea.setAttribute("aria-hidden", "true");
  // A hidden field cannot show the browser's "required" bubble; the editor
  // copy is always current, so the server still validates an empty sketch.
  textarea.removeAttribute("required");
  if (textarea.form) {
    textarea.form.addEventListener("submit", () => {
      textarea.value = view.state.doc.toString();
    });
  }
  if (name) editors.set(name, { view, textarea });
}

function lookup(name) {
  const entry = editors.get(name);
  if (entry && !entry.view.dom.isConnected) {
    editors.delete(name); // swapped out of the page (htmx)
    return undefined;
  }
  return entry;
}

// Convert one gcc/arduino-cli style diagnostic (1-based line and column) into
// a CodeMirror range: from the column to the end of the token there, or the
// whole line when no column is known.
function toRange(doc, d) {
  const lineNo = Math.min(Math.max(parseInt(d.line, 10) || 1, 1), doc.lines);
  const line = doc.line(lineNo);
  const col = parseInt(d.column, 10) || 0;
  if (col < 1) return { from: line.from, to: line.to };
  const from = line.from + Math.min(col - 1, line.length);
  let to = from;
  const text = line.text;
  while (to < line.to && /[\w$]/.test(text[to - line.from])) to++;
  if (to === from && to < line.to) to++; // at least one character (an operator, a brace)
  return { from, to };
}

function severityOf(s) {
  const v = String(s || "error").toLowerCase();
  if (v === "warning" || v === "error") return v;
  return "info"; // "note" and anything else
}

function showDiagnostics(name, diagnostics) {
  const entry = lookup(name);
  if (!entry) return false;
  const { view } = entry;
  const doc = view.state.doc;
  const list = (diagnostics || [])
    .map((d) => ({
      ...toRange(doc, d),
      severity: severityOf(d.severity),
      message: String(d.message || ""),
      source: d.line ? `line ${d.line}${d.column ? ":" + d.column : ""}` : undefined,
    }))
    .sort((a, b) => a.from - b.from);
  view.dispatch(setDiagnostics(view.state, list));
  return true;
}

function clearDiagnostics(name) {
  const entry = lookup(name);
  if (!entry) return false;
  entry.view.dispatch(setDiagnostics(entry.view.state, []));
  return true;
}

function getValue(name) {
  const entry = lookup(name);
  if (entry) return entry.view.state.doc.toString();
  const field = document.querySelector(`textarea[name="${CSS.escape(name)}"]`);
  return field ? field.value : undefined;
}

// Poll `url` (JSON {status, log, diagnostics}) every 700 ms until the build
// is succeeded or failed. The log may be sent whole each time or grow: new
// text is appended, a log that no longer starts with what is shown replaces it.
function followLog(url, pre, onDone, options = {}) {
  const editorName = options.editor || (pre && pre.dataset.editorFor) || editors.keys().next().value;
  let shown = pre ? pre.textContent : "";
  let stopped = false;
  let failures = 0;
  let timer = null;

  const render = (log) => {
    if (!pre || typeof log !== "string" || log === shown) return;
    const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 24;
    if (log.startsWith(shown)) pre.append(log.slice(shown.length));
    else pre.textContent = log;
    shown = log;
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  };

  const finish = (result) => {
    stopped = true;
    if (pre) pre.dataset.status = result.status;
    if (editorName && Array.isArray(result.diagnostics)) showDiagnostics(editorName, result.diagnostics);
    if (typeof onDone === "function") onDone(result);
  };

  const tick = async () => {
    if (stopped) return;
    try {
      const res = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" });
      if (!res.ok) throw Object.assign(new Error(`HTTP ${res.status}`), { fatal: res.status >= 400 && res.status < 500 });
      const data = await res.json();
      failures = 0;
      render(data.log);
      if (pre && data.status) pre.dataset.status = data.status;
      if (FINAL.has(data.status)) return finish(data);
    } catch (err) {
      failures += 1;
      if (err.fatal || failures >= 10) {
        render(`${shown}${shown && !shown.endsWith("\n") ? "\n" : ""}[log unavailable: ${err.message}]\n`);
        return finish({ status: "failed", log: shown, diagnostics: [], error: err.message });
      }
    }
    if (!stopped) timer = setTimeout(tick, POLL_MS);
  };

  tick();
  return { stop() { stopped = true; clearTimeout(timer); } };
}

function init(root) {
  const scope = root && root.querySelectorAll ? root : document;
  scope.querySelectorAll('textarea[data-editor="cpp"]').forEach(enhance);
  scope.querySelectorAll("pre[data-follow-log]").forEach((pre) => {
    if (pre.dataset.following) return;
    pre.dataset.following = "1";
    followLog(pre.dataset.followLog, pre);
  });
}

window.OTAForgeEditor = { showDiagnostics, clearDiagnostics, getValue, followLog, init };

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", () => init(document));
else init(document);
