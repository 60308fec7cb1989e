/* The approval queue and request pages: live countdowns, the focused row kept in place while
   rows arrive over the websocket, and keyboard shortcuts. A row shows only a summary, so no
   shortcut decides from the queue: approve, edit, reject and halt open the request page, where
   the reviewer reads the full arguments. No inline script: CSP script-src 'self'. */
(function () {
  "use strict";

  // --- countdowns ---------------------------------------------------------------------------
  function label(ms) {
    if (ms <= 0) return "overdue";
    var s = Math.floor(ms / 1000);
    if (s < 60) return "in " + s + " s";
    var m = Math.floor(s / 60);
    if (m < 60) return "in " + m + " min " + String(s % 60).padStart(2, "0") + " s";
    var h = Math.floor(m / 60);
    if (h < 48) return "in " + h + " h " + (m % 60) + " min";
    return "in " + Math.floor(h / 24) + " days";
  }
  function tick() {
    var now = Date.now();
    document.querySelectorAll("[data-deadline]").forEach(function (el) {
      var at = Date.parse(el.getAttribute("data-deadline"));
      if (isNaN(at)) return;
      var text = label(at - now);
      if (el.textContent !== text) el.textContent = text;
      var row = el.closest("tr");
      if (row) row.classList.toggle("overdue", at <= now);
    });
  }
  tick();
  setInterval(tick, 1000);

  // --- the focused row keeps its place when rows arrive above it ---------------------------
  function rows() { return Array.prototype.slice.call(document.querySelectorAll("#queue-body tr.queue-row")); }
  var focusedId = null; // the row the reviewer is on, by id (rows are replaced by live updates)
  var anchor = null;    // {id, top} before a swap

  function current() {
    if (focusedId) {
      var el = document.getElementById(focusedId);
      if (el) return el;
    }
    return null;
  }
  function focusRow(row, scroll) {
    if (!row) return;
    rows().forEach(function (r) { r.classList.remove("is-focused"); r.setAttribute("tabindex", "-1"); });
    row.classList.add("is-focused");
    row.setAttribute("tabindex", "0");
    focusedId = row.id;
    row.focus({ preventScroll: !scroll });
    if (scroll) row.scrollIntoView({ block: "nearest" });
  }
  function remember() {
    var row = current();
    anchor = row ? { id: row.id, top: row.getBoundingClientRect().top, hadFocus: row.contains(document.activeElement) } : null;
  }
  function restore() {
    if (!anchor) return;
    var row = document.getElementById(anchor.id);
    if (row) {
      window.scrollBy(0, row.getBoundingClientRect().top - anchor.top);
      row.classList.add("is-focused");
      row.setAttribute("tabindex", "0");
      if (anchor.hadFocus) row.focus({ preventScroll: true });
    }
    anchor = null;
  }
  document.addEventListener("htmx:wsBeforeMessage", remember);
  document.addEventListener("htmx:oobBeforeSwap", function () { if (!anchor) remember(); });
  document.addEventListener("htmx:oobAfterSwap", restore);
  document.addEventListener("htmx:wsAfterMessage", restore);

  document.addEventListener("focusin", function (event) {
    var row = event.target.closest && event.target.closest("tr.queue-row");
    if (row) { focusedId = row.id; rows().forEach(function (r) { r.classList.toggle("is-focused", r === row); }); }
  });
  document.addEventListener("click", function (event) {
    var row = event.target.closest && event.target.closest("tr.queue-row");
    if (row && !event.target.closest("a, button")) focusRow(row, false);
  });

  // --- filters submit on change --------------------------------------------------------------
  var filters = document.getElementById("queue-filters");
  if (filters) filters.addEventListener("change", function () { filters.requestSubmit(); });

  // --- notices for keyboard actions -----------------------------------------------------------
  function notice(text) {
    var el = document.getElementById("queue-notice");
    if (el) el.textContent = text;
  }
  function post(row, url) {
    if (!window.htmx || !url) return;
    htmx.ajax("POST", url, { source: row, swap: "none" }).then(function () {});
  }
  document.addEventListener("htmx:afterRequest", function (event) {
    var xhr = event.detail.xhr;
    if (!document.getElementById("queue-notice") || !xhr) return;
    if (xhr.status >= 400) {
      var doc = new DOMParser().parseFromString(xhr.responseText, "text/html");
      var error = doc.querySelector(".banner-error, .field-error");
      notice(error ? error.textContent.trim() : "That did not work (" + xhr.status + ").");
    } else if (xhr.status < 300) {
      notice("");
    }
  });

  // --- keyboard ----------------------------------------------------------------------------
  var help = document.getElementById("queue-help");
  var helpButton = document.getElementById("queue-help-open");
  if (help && helpButton) helpButton.addEventListener("click", function () { help.showModal(); });

  function typing(target) {
    return target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName));
  }
  document.addEventListener("keydown", function (event) {
    if (!document.getElementById("queue-body")) return;
    if (event.ctrlKey || event.metaKey || event.altKey || typing(event.target)) return;
    if (help && help.open) return;
    var list = rows();
    var row = current();
    var index = row ? list.indexOf(row) : -1;
    var open = function (form) {
      if (row) window.location.href = row.getAttribute("data-href") + (form ? "?form=" + form : "");
    };
    switch (event.key) {
      case "j": focusRow(list[Math.min(index + 1, list.length - 1)], true); break;
      case "k": focusRow(list[Math.max(index - 1, 0)], true); break;
      case "Enter": if (row && !(event.target.closest && event.target.closest("a, button"))) open(""); else return; break;
      case "c": if (row) post(row, row.getAttribute("data-claim-url")); break;
      case "a": open(""); break; // a row shows a summary: decisions are taken on the full request
      case "e": open("edit"); break;
      case "r": open("reject"); break;
      case "h": open("halt"); break;
      case "?": if (help) help.showModal(); break;
      default: return;
    }
    event.preventDefault();
  });
})();
