// footfall site page: draws the range's charts with uPlot from the data the server embedded
// (#dashboard-data, the same JSON as /api/v1/sites/<site>/dashboard). People figures only:
// visitors (arrivals) against the previous period, and people in the shop (mean, peak).
// Periods without data stay null, drawn as gaps; y-axes start at zero. The uPlot instances
// stay on window.footfallCharts, so a test can read what was drawn.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("dashboard-data").textContent);
  const charts = {};
  window.footfallCharts = charts;
  const hourly = data.resolution === "hour";

  function width(el) { return Math.max(240, el.clientWidth); }

  // The x positions of the range: hours 0..23, or each local day from first to last.
  function slots(first, last) {
    if (hourly) { return Array.from({ length: 24 }, (_, h) => String(h).padStart(2, "0") + ":00"); }
    const out = [];
    for (let t = Date.parse(first + "T00:00:00Z"); t <= Date.parse(last + "T00:00:00Z"); t += 86400000) {
      out.push(new Date(t).toISOString().slice(0, 10));
    }
    return out;
  }
  const labels = slots(data.first, data.last);
  const before = slots(data.previous_first, data.previous_last);

  // A figure per slot; null where the slot has no row, no data or nothing published.
  function series(rows, names, measure) {
    const at = new Map(rows.map((r) => [hourly ? r.local.slice(11) : r.local, r]));
    return names.map((name) => {
      const row = at.get(name);
      return row && !row.no_data ? row[measure] : null;
    });
  }

  function zeroBased(u, lo, hi) { return [0, Math.max(1, hi || 0) * 1.1]; }
  function xAxis() {
    return { values: (u, ticks) => ticks.map((i) => labels[i] === undefined ? "" : (hourly ? labels[i] : labels[i].slice(5))) };
  }

  function chart(name, height, lines) {
    const el = document.getElementById("chart-" + name);
    const xs = labels.map((_, i) => i);
    charts[name] = new uPlot({
      width: width(el), height: height,
      scales: { x: { time: false }, y: { range: zeroBased } },
      axes: [xAxis(), { label: "people" }],
      series: [{ label: data.resolution, value: (u, i) => i == null ? "" : labels[i] }].concat(
        lines.map((l) => ({ label: l.label, stroke: l.stroke, width: l.width || 2, dash: l.dash,
                            points: { show: !hourly }, spanGaps: false }))),
    }, [xs].concat(lines.map((l) => l.values)), el);
  }

  chart("people", 260, [
    { label: "visitors (people)", stroke: "#1f6feb", values: series(data.rows, labels, "arrivals") },
    { label: "visitors, previous period", stroke: "#98a2b3", width: 1.5, dash: [6, 4],
      values: labels.map((_, i) => series(data.previous, before, "arrivals")[i] ?? null) },
  ]);
  chart("occupancy", 220, [
    { label: "in the shop, mean (people)", stroke: "#067647", values: series(data.rows, labels, "occupancy_mean") },
    { label: "peak (people)", stroke: "#f79009", width: 1.5, values: series(data.rows, labels, "occupancy_peak") },
  ]);

  const range = document.getElementById("range");
  function custom() { document.querySelector(".custom").hidden = range.value !== "custom"; }
  range.addEventListener("change", custom);
  custom();
  window.addEventListener("resize", () => {
    for (const [name, c] of Object.entries(charts)) {
      c.setSize({ width: width(document.getElementById("chart-" + name)), height: c.height });
    }
  });
  document.body.dataset.chartsReady = "1";
})();
