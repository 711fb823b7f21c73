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
//   <pre class="log" data-follow-log="/builds/42/status.json" data-editor-for="sketch"
//        data-editor-file="sketch.ino">
//
// Tabs: when the textarea's form holds <script type="application/json" id="sketch-files">
// (every file name -> its saved content), an <input id="current-file"> and the tab links
// <a data-file="NAME"> in #file-tabs, switching tabs happens in the page: each file keeps
// its own editor state (text, undo history, diagnostics), a tab with unsaved edits is
// marked, and Save sends the edits of every tab (fields `other:NAME` beside the current
// file's). Ctrl+S / Cmd+S saves. Without JavaScript the tab links load each file's page.

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
import { autocompletion, completeAnyWord, completionKeymap } from "@codemirror/autocomplete";

// The Arduino API offered by autocomplete, beside the words of the file itself.
const ARDUINO = [
  ["setup", "function", "runs once at start"], ["loop", "function", "runs again and again"],
  ["pinMode", "function", "pinMode(pin, INPUT | OUTPUT | INPUT_PULLUP)"],
  ["digitalWrite", "function", "digitalWrite(pin, HIGH | LOW)"], ["digitalRead", "function", "digitalRead(pin) -> HIGH | LOW"],
  ["analogRead", "function", "analogRead(pin) -> 0..1023 (ESP32: 0..4095)"], ["analogWrite", "function", "analogWrite(pin, duty)"],
  ["delay", "function", "delay(ms)"], ["delayMicroseconds", "function", "delayMicroseconds(us)"],
  ["millis", "function", "ms since start"], ["micros", "function", "us since start"],
  ["attachInterrupt", "function", "attachInterrupt(digitalPinToInterrupt(pin), isr, mode)"],
  ["digitalPinToInterrupt", "function"], ["detachInterrupt", "function"],
  ["map", "function", "map(value, fromLow, fromHigh, toLow, toHigh)"], ["constrain", "function", "constrain(x, low, high)"],
  ["random", "function", "random(max) or random(min, max)"], ["randomSeed", "function"],
  ["tone", "function", "tone(pin, frequency[, ms])"], ["noTone", "function"],
  ["Serial.begin", "method", "Serial.begin(115200)"], ["Serial.print", "method"], ["Serial.println", "method"],
  ["Serial.printf", "method", "ESP32 / ESP8266"], ["Serial.available", "method"], ["Serial.read", "method"],
  ["Serial.readStringUntil", "method"], ["Serial.write", "method"], ["Serial.flush", "method"],
  ["WiFi.begin", "method", "WiFi.begin(ssid, password)"], ["WiFi.status", "method", "== WL_CONNECTED when joined"],
  ["WiFi.localIP", "method"], ["WiFi.mode", "method", "WiFi.mode(WIFI_STA)"], ["WiFi.scanNetworks", "method"],
  ["WiFi.SSID", "method"], ["WiFi.RSSI", "method"], ["WiFi.disconnect", "method"],
  ["ESP.restart", "method"], ["ESP.getFreeHeap", "method"],
  ["HIGH", "constant"], ["LOW", "constant"], ["INPUT", "constant"], ["OUTPUT", "constant"], ["INPUT_PULLUP", "constant"],
  ["LED_BUILTIN", "constant"], ["WL_CONNECTED", "constant"], ["WIFI_STA", "constant"],
  ["RISING", "constant"], ["FALLING", "constant"], ["CHANGE", "constant"],
  ["String", "type"], ["uint8_t", "type"], ["uint16_t", "type"], ["uint32_t", "type"], ["int32_t", "type"], ["bool", "type"],
  ["otaforge_check_now", "function", "check the firmware link now (OTAForge update header)"],
  ["otaforge_begin", "function", "OTAForge: join Wi-Fi, arm the trigger button (runs before setup())"],
  ["otaforge_loop", "function", "OTAForge: button, timer, reconnect (runs after each loop())"],
].map(([label, type, detail]) => ({ label, type, detail }));

function arduinoCompletions(context) {
  const word = context.matchBefore(/[A-Za-z_][\w.]*/);
  if (!word || (word.from === word.to && !context.explicit)) return null;
  return { from: word.from, options: ARDUINO, validFor: /^[\w.]*$/ };
}

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

function extensionsFor(textarea, readOnly, onChange) {
  return [
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
    autocompletion({ override: [arduinoCompletions, completeAnyWord] }),
    lintGutter(),
    keymap.of([...completionKeymap, ...defaultKeymap, ...historyKeymap, indentWithTab]),
    EditorState.tabSize.of(2),
    EditorState.readOnly.of(readOnly),
    EditorView.editable.of(!readOnly),
    EditorView.contentAttributes.of({ "aria-label": labelFor(textarea) }),
    theme,
    // Long lines wrap: on a phone the editor never scrolls sideways.
    EditorView.lineWrapping,
    EditorView.updateListener.of((update) => {
      if (update.docChanged) onChange(update.state);
    }),
  ];
}

// The tabs of a multi-file sketch, kept in the page (see the header).
function tabsFor(textarea) {
  const form = textarea.form;
  const data = form && form.querySelector("#sketch-files");
  const current = form && form.querySelector("#current-file");
  const nav = document.getElementById("file-tabs");
  if (!data || !current || !nav) return null;
  let saved;
  try {
    saved = JSON.parse(data.textContent);
  } catch (_) {
    return null;
  }
  return { form, saved, current, nav, states: new Map() };
}

function enhance(textarea) {
  if (textarea.dataset.editorReady) return;
  textarea.dataset.editorReady = "1";
  const name = textarea.name || textarea.id;
  const readOnly = textarea.readOnly || textarea.disabled;
  const tabs = tabsFor(textarea);

  const markTabs = () => {
    if (!tabs) return;
    tabs.nav.querySelectorAll("a[data-file]").forEach((a) => {
      const file = a.dataset.file;
      const state = file === tabs.current.value ? view.state : tabs.states.get(file);
      const dirty = !!state && state.doc.toString() !== tabs.saved[file];
      a.classList.toggle("dirty", dirty);
      a.title = dirty ? `${file}: unsaved edits` : file;
    });
  };
  // Keep the real form field current so a plain submit carries the code.
  const onChange = (state) => {
    textarea.value = state.doc.toString();
    markTabs();
  };
  const extensions = extensionsFor(textarea, readOnly, onChange);
  const view = new EditorView({ state: EditorState.create({ doc: textarea.value, extensions }) });

  textarea.insertAdjacentElement("afterend", view.dom);
  textarea.style.display = "none";
  textarea.setAttribute("aria-hidden", "true");
  // A hidden field cannot show the browser's "required" bubble; the editor
  // copy is always current, so the server still validates an empty sketch.
  textarea.removeAttribute("required");
  if (textarea.form) {
    textarea.form.addEventListener("submit", () => {
      textarea.value = view.state.doc.toString();
      if (!tabs) return;
      tabs.form.querySelectorAll("input[data-other]").forEach((i) => i.remove());
      for (const [file, state] of tabs.states) {
        if (file === tabs.current.value || state.doc.toString() === tabs.saved[file]) continue;
        const field = document.createElement("input");
        field.type = "hidden";
        field.name = `other:${file}`;
        field.value = state.doc.toString();
        field.dataset.other = "1";
        tabs.form.append(field);
      }
    });
  }
  if (tabs) {
    tabs.nav.addEventListener("click", (event) => {
      const link = event.target.closest("a[data-file]");
      if (!link || !(link.dataset.file in tabs.saved)) return;
      event.preventDefault();
      const to = link.dataset.file;
      const from = tabs.current.value;
      if (to === from) return;
      tabs.states.set(from, view.state);
      view.setState(tabs.states.get(to) || EditorState.create({ doc: tabs.saved[to], extensions }));
      tabs.current.value = to;
      textarea.value = view.state.doc.toString();
      tabs.nav.querySelectorAll("a[data-file]").forEach((a) => {
        const on = a.dataset.file === to;
        a.classList.toggle("current", on);
        if (on) a.setAttribute("aria-current", "page");
        else a.removeAttribute("aria-current");
      });
      const url = new URL(location.href);
      url.searchParams.set("file", to);
      history.replaceState(null, "", url);
      markTabs();
      view.focus();
    });
  }
  if (name) editors.set(name, { view, textarea, tabs });
}

// Ctrl+S / Cmd+S anywhere on a page with a sketch form presses its Save button.
document.addEventListener("keydown", (event) => {
  if (!(event.ctrlKey || event.metaKey) || event.altKey || event.key.toLowerCase() !== "s") return;
  const save = document.getElementById("save");
  if (!save || !save.form) return;
  event.preventDefault();
  save.form.requestSubmit(save);
});

function lookup(name) {
  const entry = editors.get(name);
  if (entry && !entry.view.dom.isConnected) {
    editors.delete(name); // no longer in the page
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

// The editor state a file's diagnostics go to: the view's when it shows that file (or no
// file is named), else the state its tab keeps.
function withStateOf(entry, file, change) {
  const { view, tabs } = entry;
  if (!tabs || !file || tabs.current.value === file) {
    view.dispatch(change(view.state));
    return;
  }
  const state = tabs.states.get(file);
  if (state) tabs.states.set(file, state.update(change(state)).state);
}

function showDiagnostics(name, diagnostics, file) {
  const entry = lookup(name);
  if (!entry) return false;
  const { view, tabs } = entry;
  const kept = tabs && file && tabs.current.value !== file ? tabs.states.get(file) : null;
  if (tabs && file && tabs.current.value !== file && !kept) return false;
  const doc = (kept || view.state).doc;
  const list = (diagnostics || [])
    .map((d) => ({
      ...toRange(doc, d),
      severity: severityOf(d.severity),
      message: String(d.message || ""),
      source: d.line ? `line ${d.line}${d.column ? ":" + d.column : ""}` : undefined,
    }))
    .sort((a, b) => a.from - b.from);
  withStateOf(entry, file, (state) => setDiagnostics(state, list));
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
  // A log names the editor its diagnostics belong to; a build made from other code than
  // the editor holds names none, and its errors are not painted onto this code.
  const editorName = options.editor || (pre ? pre.dataset.editorFor : editors.keys().next().value);
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
    if (editorName && Array.isArray(result.diagnostics)) showDiagnostics(editorName, result.diagnostics, pre && pre.dataset.editorFile);
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
