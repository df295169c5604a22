// mailrelay admin: the only script. It never builds HTML from data: text goes in with textContent.
"use strict";

// Destructive buttons ask first (forms carry data-confirm).
document.addEventListener("submit", (event) => {
  const question = event.target.getAttribute("data-confirm");
  if (question && !window.confirm(question)) event.preventDefault();
});

// The configuration editor: put the cursor on the line an error names.
document.addEventListener("DOMContentLoaded", () => {
  const editor = document.getElementById("config-text");
  const line = editor && Number(editor.getAttribute("data-error-line"));
  if (line > 0) {
    const offset = editor.value.split("\n").slice(0, line - 1).join("\n").length + (line > 1 ? 1 : 0);
    editor.focus();
    editor.setSelectionRange(offset, offset);
  }
});

// The dashboard: counters and recent events as they happen (Server-Sent Events).
const SHOWN = ["received", "rejected", "quarantined", "message.delivered", "message.deferred",
               "message.bounced", "message.expired"];
const COUNTED = SHOWN.concat(["smtp.rejected", "discarded", "auth.failed", "auth.succeeded"]);

function summary(e) {
  const d = e.data || {};
  if (e.name === "received" || e.name === "quarantined") {
    return "from <" + (d.sender || "") + "> to " + (d.recipients || []).join(", ");
  }
  const parts = [d.recipient, d.reply || d.error || d.reason].filter(Boolean);
  return parts.join(": ");
}

// The same form as the server-rendered rows: 2024-05-01 13:45:07, local time.
function clock(seconds) {
  const t = new Date(seconds * 1000);
  const two = (n) => String(n).padStart(2, "0");
  return t.getFullYear() + "-" + two(t.getMonth() + 1) + "-" + two(t.getDate()) + " " +
         two(t.getHours()) + ":" + two(t.getMinutes()) + ":" + two(t.getSeconds());
}

function addRow(e) {
  const body = document.querySelector("#events tbody");
  if (!body) return;
  const row = document.createElement("tr");
  row.className = "event";
  row.setAttribute("data-event", e.name);
  row.setAttribute("data-message-id", e.message_id || "");
  const cells = [clock(e.time), e.name, null, summary(e)];
  cells.forEach((text, i) => {
    const cell = document.createElement("td");
    if (i === 2 && e.message_id) {
      const link = document.createElement("a");
      link.href = "/queue/" + encodeURIComponent(e.message_id);
      link.textContent = e.message_id;
      cell.appendChild(link);
    } else {
      cell.textContent = text || "";
    }
    row.appendChild(cell);
  });
  body.insertBefore(row, body.firstChild);
  while (body.rows.length > 100) body.deleteRow(body.rows.length - 1);
}

let statsPending = false;
function refreshStats() {
  if (statsPending) return;
  statsPending = true;
  setTimeout(() => {
    fetch("/api/v1/stats", {credentials: "same-origin"})
      .then((r) => (r.ok ? r.json() : null))
      .then((stats) => {
        if (!stats) return;
        document.querySelectorAll("[data-counter]").forEach((el) => {
          el.textContent = String(stats.counters[el.getAttribute("data-counter")] || 0);
        });
        document.querySelectorAll("[data-gauge]").forEach((el) => {
          const value = stats.queue[el.getAttribute("data-gauge")];
          el.textContent = value === null || value === undefined ? "-" : String(Math.round(value));
        });
      })
      .finally(() => { statsPending = false; });
  }, 500);
}

document.addEventListener("DOMContentLoaded", () => {
  const table = document.getElementById("events");
  if (!table || !window.EventSource) return;
  const since = table.getAttribute("data-last-seq") || "0";
  const source = new EventSource("/api/v1/events/stream?since=" + encodeURIComponent(since));
  const live = document.getElementById("live");
  source.onopen = () => live && live.classList.add("on");
  source.onerror = () => live && live.classList.remove("on");
  COUNTED.forEach((name) => source.addEventListener(name, (message) => {
    const e = JSON.parse(message.data);
    if (SHOWN.includes(e.name)) addRow(e);
    refreshStats();
  }));
  window.addEventListener("pagehide", () => source.close());
});
