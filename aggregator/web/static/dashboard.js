// footfall site page: draws the day's and the 4 weeks' charts with uPlot from the data the
// server embedded (#dashboard-data, the same JSON as /api/v1/sites/<site>/dashboard).
// The uPlot instances stay on window.footfallCharts, so a test can read what was drawn.
"use strict";
(function () {
  const data = JSON.parse(document.getElementById("dashboard-data").textContent);
  const charts = {};
  window.footfallCharts = charts;

  function width(el) { return Math.max(280, el.clientWidth); }

  // Hours 0..23 of the day, each series null where that hour has no published value.
  function byHour(rows, measure) {
    const out = new Array(24).fill(null);
    for (const row of rows) { out[Number(row.local.slice(11, 13))] = row[measure]; }
    return out;
  }

  function hoursChart() {
    const el = document.getElementById("chart-hours");
    const hours = Array.from({ length: 24 }, (_, h) => h);
    const series = [
      byHour(data.today, "visitors"),
      byHour(data.today, "passersby"),
      byHour(data.last_week, "visitors"),
    ];
    charts.hours = new uPlot({
      width: width(el), height: 260,
      scales: { x: { time: false } },
      axes: [{ values: (u, ticks) => ticks.map((h) => String(h).padStart(2, "0") + ":00") }, {}],
      series: [
        { label: "hour", value: (u, h) => h == null ? "" : String(h).padStart(2, "0") + ":00" },
        { label: "visitors", stroke: "#1f6feb", width: 2, fill: "rgba(31,111,235,0.08)" },
        { label: "passers-by", stroke: "#f79009", width: 2 },
        { label: "visitors a week before", stroke: "#98a2b3", width: 1.5, dash: [6, 4] },
      ],
    }, [hours, ...series], el);
  }

  function daysChart() {
    const el = document.getElementById("chart-days");
    const xs = data.days.map((row) => Date.parse(row.local + "T12:00:00Z") / 1000);
    charts.days = new uPlot({
      width: width(el), height: 240,
      series: [
        { label: "day" },
        { label: "visitors", stroke: "#1f6feb", width: 2, points: { show: true } },
        { label: "passers-by", stroke: "#f79009", width: 2, points: { show: true } },
      ],
    }, [xs, data.days.map((r) => r.visitors), data.days.map((r) => r.passersby)], el);
  }

  hoursChart();
  daysChart();
  window.addEventListener("resize", () => {
    for (const [name, chart] of Object.entries(charts)) {
      chart.setSize({ width: width(document.getElementById("chart-" + name)), height: chart.height });
    }
  });
  document.body.dataset.chartsReady = "1";
})();
