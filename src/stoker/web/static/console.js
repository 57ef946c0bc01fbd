/* stoker console: draws each chart the server rendered as JSON with uPlot, again after
   htmx swaps a part of the page, and resizes them with the window. No other behaviour:
   pages are server-rendered and htmx does the rest. */
(function () {
  "use strict";
  var KiB = 1024, UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

  function format(unit, v) {
    if (v == null) return "-";
    if (unit === "bytes") {
      var i = 0;
      while (Math.abs(v) >= KiB && i < UNITS.length - 1) { v /= KiB; i++; }
      return (Math.round(v * 10) / 10) + " " + UNITS[i];
    }
    if (unit === "percent") return (Math.round(v * 10) / 10) + "%";
    if (unit === "cores") return (Math.round(v * 100) / 100) + "";
    return String(Math.round(v * 100) / 100);
  }

  var plots = [];
  // not an attribute: htmx carries the attributes of a swapped element (by id) over to its
  // replacement while it settles, which would mark a new chart as drawn
  var drawn = new WeakSet();

  function draw(figure) {
    if (drawn.has(figure) || typeof uPlot === "undefined") return;
    drawn.add(figure);
    var target = figure.querySelector(".plot");
    var spec = JSON.parse(target.dataset.chart);
    if (!spec.data[0].length) {
      target.textContent = "No samples in this range yet.";
      return;
    }
    var series = [{}].concat(spec.series.map(function (s) {
      return {
        label: s.label, stroke: s.colour, width: s.dashed ? 1.5 : 2,
        dash: s.dashed ? [6, 4] : undefined,
        points: { show: !s.dashed },
        value: function (u, v) { return format(spec.unit, v); }
      };
    }));
    var plot = new uPlot({
      width: Math.max(240, target.clientWidth), height: 200,
      series: series,
      axes: [{}, { size: 84, values: function (u, ticks) {
        return ticks.map(function (t) { return format(spec.unit, t); });
      } }],
      scales: { y: { range: function (u, min, max) { return [0, max > 0 ? max * 1.1 : 1]; } } }
    }, spec.data, target);
    plots.push({ plot: plot, target: target });
  }

  function drawAll() {
    plots = plots.filter(function (p) { return document.body.contains(p.target); });
    document.querySelectorAll("figure.chart").forEach(draw);
  }

  document.addEventListener("DOMContentLoaded", drawAll);
  document.addEventListener("htmx:afterSettle", drawAll);
  var pending = null;
  window.addEventListener("resize", function () {
    clearTimeout(pending);
    pending = setTimeout(function () {
      plots.forEach(function (p) { p.plot.setSize({ width: Math.max(240, p.target.clientWidth), height: 200 }); });
    }, 150);
  });
})();
