// devstreams console: keeps the page current from /console/live (server-sent
// events). The pages work without it; it only updates numbers and rows.
"use strict";

(function () {
  const page = document.body.dataset.page;
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : "";

  // Copy buttons (the connection string shown once).
  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", async function () {
      const field = document.getElementById(button.dataset.copy);
      if (!field) return;
      try {
        await navigator.clipboard.writeText(field.value);
      } catch (_) {
        field.select();
        document.execCommand("copy");
      }
      button.textContent = "Copied";
    });
  }

  // Devices: filter rows while typing in the search box.
  const search = document.getElementById("search");
  if (search) {
    search.addEventListener("input", function () {
      const needle = search.value.toLowerCase();
      for (const row of document.querySelectorAll("#devices tbody tr")) {
        row.hidden = needle !== "" && !row.dataset.deviceId.toLowerCase().includes(needle);
      }
    });
  }

  if (!["overview", "devices", "streams"].includes(page)) return;

  function formatTime(unix) {
    if (unix === null || unix === undefined) return "—";
    return new Date(unix * 1000).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }
  function timeCell(cell, unix) {
    cell.textContent = "";
    if (unix === null || unix === undefined) { cell.textContent = "—"; return; }
    const time = document.createElement("time");
    time.dataset.unix = String(unix);
    time.textContent = formatTime(unix);
    cell.appendChild(time);
  }
  function formatBytes(bytes) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = bytes, unit = 0;
    while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
    return unit === 0 ? bytes + " B" : value.toFixed(1) + " " + units[unit];
  }
  function bytesCell(cell, bytes) {
    let span = cell.querySelector("[data-bytes]");
    if (!span) { span = document.createElement("span"); cell.textContent = ""; cell.appendChild(span); }
    span.dataset.bytes = String(bytes);
    span.textContent = formatBytes(bytes);
  }
  function setText(id, text) {
    const element = document.getElementById(id);
    if (element) element.textContent = text;
  }

  // Overview: rates from the differences of cumulative counters.
  const history = [];
  const HISTORY_LENGTH = 120;
  let previous = null;
  function updateOverview(data) {
    setText("devices-online", data.devicesOnline);
    setText("devices-registered", data.devicesRegistered);
    setText("live-streams", data.liveStreams);
    const now = performance.now() / 1000;
    if (previous) {
      const seconds = Math.max(now - previous.at, 0.001);
      const bytesRate = Math.max(data.bytesTotal - previous.bytesTotal, 0) / seconds;
      const creationsRate = Math.max(data.streamsRequested - previous.streamsRequested, 0) * 60 / seconds;
      history.push({ bytes: bytesRate, creations: creationsRate });
      if (history.length > HISTORY_LENGTH) history.shift();
      setText("bytes-rate", formatBytes(Math.round(bytesRate)));
      setText("creations-rate", creationsRate.toFixed(0));
      drawChart();
    }
    previous = { at: now, bytesTotal: data.bytesTotal, streamsRequested: data.streamsRequested };
  }
  function drawChart() {
    const width = 600, height = 160, margin = 6;
    for (const [key, id] of [["bytes", "chart-bytes"], ["creations", "chart-creations"]]) {
      const line = document.getElementById(id);
      if (!line) continue;
      const peak = Math.max(1, ...history.map(point => point[key]));
      const step = width / (HISTORY_LENGTH - 1);
      const offset = (HISTORY_LENGTH - history.length) * step;
      const points = history.map((point, index) =>
        (offset + index * step).toFixed(1) + "," + (height - margin - (point[key] / peak) * (height - 2 * margin)).toFixed(1));
      line.setAttribute("points", points.join(" "));
      setText(id + "-peak", key === "bytes" ? formatBytes(Math.round(peak)) + "/s" : peak.toFixed(0));
    }
  }

  // Live streams: rows updated in place, so focus on a button survives.
  function updateStreams(streams) {
    const body = document.querySelector("#streams tbody");
    if (!body) return;
    const seen = new Set();
    for (const stream of streams) {
      seen.add(stream.streamId);
      let row = body.querySelector('tr[data-stream-id="' + CSS.escape(stream.streamId) + '"]');
      if (!row) {
        row = newStreamRow(stream);
        body.appendChild(row);
      }
      bytesCell(row.querySelector(".to-service"), stream.bytesDeviceToService);
      bytesCell(row.querySelector(".to-device"), stream.bytesServiceToDevice);
    }
    for (const row of Array.from(body.querySelectorAll("tr"))) {
      if (!seen.has(row.dataset.streamId) && !row.contains(document.activeElement)) row.remove();
    }
    const empty = document.getElementById("no-streams");
    if (empty) empty.hidden = streams.length > 0;
  }
  function cell(row, text, header) {
    const element = document.createElement(header ? "th" : "td");
    if (header) element.scope = "row";
    element.textContent = text;
    row.appendChild(element);
    return element;
  }
  function newStreamRow(stream) {
    const row = document.createElement("tr");
    row.dataset.streamId = stream.streamId;
    cell(row, stream.moduleId ? stream.deviceId + "/" + stream.moduleId : stream.deviceId, true);
    cell(row, stream.serviceAddress);
    cell(row, stream.streamName);
    cell(row, stream.targetPort === null ? "—" : String(stream.targetPort));
    timeCell(cell(row, ""), stream.started);
    cell(row, "").className = "to-service";
    cell(row, "").className = "to-device";
    const actions = cell(row, "");
    const form = document.createElement("form");
    form.method = "post";
    form.action = "/console/streams/" + encodeURIComponent(stream.streamId) + "/end";
    const token = document.createElement("input");
    token.type = "hidden"; token.name = "csrf"; token.value = csrf;
    const button = document.createElement("button");
    button.type = "submit"; button.className = "danger"; button.dataset.action = "end";
    button.textContent = "End session";
    form.appendChild(token); form.appendChild(button);
    actions.appendChild(form);
    return row;
  }

  // Devices: online state, since, address, streams and activity per row.
  function updateDevices(devices) {
    if (!devices) return;
    for (const device of devices) {
      const row = document.querySelector('#devices tr[data-device-id="' + CSS.escape(device.deviceId) + '"]');
      if (!row) continue;
      row.dataset.online = String(device.online);
      const badge = row.querySelector(".state .badge");
      if (badge) {
        let text = device.online ? "online" : "offline";
        if (!device.registered) text += ", not registered";
        else if (!device.enabled) text += ", disabled";
        badge.textContent = text;
        badge.className = "badge " + (device.online ? "online" : "offline");
      }
      timeCell(row.querySelector(".since"), device.online ? device.connectedSince : device.lastSeen);
      row.querySelector(".address").textContent = device.address || "—";
      row.querySelector(".streams").textContent = String(device.liveStreams);
      timeCell(row.querySelector(".activity"), device.lastActivity);
    }
  }

  const source = new EventSource("/console/live" + (page === "devices" ? "?devices=1" : ""));
  source.onmessage = function (event) {
    const data = JSON.parse(event.data);
    if (page === "overview") updateOverview(data);
    if (page === "streams") updateStreams(data.streams);
    if (page === "devices") updateDevices(data.devices);
  };
  source.onerror = function () {
    // Closed for good (401: the session ended): the page sends to sign-in.
    if (source.readyState === EventSource.CLOSED) window.location.reload();
  };
})();
