// The page at GET /insights (a browser asking for HTML): fetch()es the same address's JSON
// and draws it as a verdict, charts (inline SVG, no library) and tables. No framework, no
// build step, no request to any other origin. Data from the service is only ever set with
// textContent or as attribute values, never parsed as HTML.
"use strict";

(function () {
  var SVG_NS = "http://www.w3.org/2000/svg";
  var DEFAULT_DAYS = 7;
  var MAX_DAYS = 366;
  var SERIES = 6; // colours in insights.css: .series-0 … .series-5
  var METRICS = {
    visitorClickRate: "Visitors who clicked",
    visitorAddRate: "Visitors who added to the cart",
    visitorOrderRate: "Visitors who ordered",
    revenuePerVisitor: "Revenue per visitor",
    ctr: "Click-through rate"
  };
  var MONEY_METRICS = {revenuePerVisitor: true};
  var SHORT = {  // in the chart of the intervals
    visitorClickRate: "clicked",
    visitorAddRate: "added to the cart",
    visitorOrderRate: "ordered",
    revenuePerVisitor: "revenue per visitor"
  };

  function $(id) { return document.getElementById(id); }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  function svg(tag, attrs, parent) {
    var node = document.createElementNS(SVG_NS, tag);
    Object.keys(attrs || {}).forEach(function (name) {
      if (attrs[name] !== undefined && attrs[name] !== null) node.setAttribute(name, attrs[name]);
    });
    if (parent) parent.appendChild(node);
    return node;
  }

  function svgText(parent, x, y, text, className, anchor) {
    var node = svg("text", {x: x, y: y, "class": className || null,
                            "text-anchor": anchor || null}, parent);
    node.textContent = String(text);
    return node;
  }

  // --- numbers, for people ----------------------------------------------------------------

  var integerFormat = new Intl.NumberFormat(undefined, {maximumFractionDigits: 0});
  var moneyFormat = new Intl.NumberFormat(undefined, {minimumFractionDigits: 2,
                                                      maximumFractionDigits: 2});
  var oneDecimal = new Intl.NumberFormat(undefined, {minimumFractionDigits: 1,
                                                     maximumFractionDigits: 1});
  var NBSP = "\u00a0";
  var DASH = "–";

  function isNumber(x) { return typeof x === "number" && isFinite(x); }
  function integer(x) { return isNumber(x) ? integerFormat.format(x) : DASH; }
  function money(x) { return isNumber(x) ? moneyFormat.format(x) : DASH; }
  function percent(x) { return isNumber(x) ? oneDecimal.format(100 * x) + NBSP + "%" : DASH; }

  function interval(rate) {
    if (!rate || !isNumber(rate.low) || !isNumber(rate.high)) return "";
    return "(" + oneDecimal.format(100 * rate.low) + DASH + oneDecimal.format(100 * rate.high) +
      ")";
  }

  function points(difference) {
    if (!isNumber(difference)) return DASH;
    var text = oneDecimal.format(Math.abs(100 * difference));
    var sign = difference > 0 ? "+" : difference < 0 ? "−" : "±";
    return sign + text + NBSP + "points";
  }

  function pValue(p) {
    if (!isNumber(p)) return DASH;
    if (p < 0.001) return "<" + NBSP + "0.001";
    return String(Number(p.toPrecision(3)));
  }

  function shortDate(iso) {
    var date = new Date(iso + "T00:00:00Z");
    if (isNaN(date.getTime())) return iso;
    return date.toLocaleDateString(undefined, {day: "numeric", month: "short", timeZone: "UTC"});
  }

  // --- the address (?days=) and the token ----------------------------------------------
  // The insights token never travels in an address (addresses end up in logs, proxies and
  // browser history): it comes from the form, or from the fragment (#token=…, which no
  // request carries), is kept for this tab in sessionStorage, and the address is cleaned.

  var TOKEN_KEY = "segment-personalize.insights-token";

  function storedToken() {
    try { return window.sessionStorage.getItem(TOKEN_KEY) || ""; } catch (e) { return ""; }
  }

  function storeToken(token) {
    try { window.sessionStorage.setItem(TOKEN_KEY, token); } catch (e) { /* this page only */ }
  }

  function takeTokenFromAddress() {
    var params = new URLSearchParams(window.location.search);
    var fragment = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    var token = (fragment.get("token") || params.get("token") || "").trim();
    if (fragment.has("token") || params.has("token")) {
      params.delete("token");
      window.history.replaceState(null, "", window.location.pathname +
                                  (params.toString() ? "?" + params.toString() : ""));
    }
    if (token) storeToken(token);
  }

  function readAddress() {
    var params = new URLSearchParams(window.location.search);
    var days = parseInt(params.get("days") || "", 10);
    if (!(days >= 1 && days <= MAX_DAYS) || String(days) !== (params.get("days") || "").trim()) {
      days = DEFAULT_DAYS;
    }
    return {days: days, token: storedToken()};
  }

  function showDays(days) {
    var select = $("days");
    var value = String(days);
    var known = Array.prototype.some.call(select.options, function (o) {
      return o.value === value;
    });
    if (!known) {
      var option = el("option", null, "last " + days + (days === 1 ? " day" : " days"));
      option.value = value;
      select.insertBefore(option, select.firstChild);
    }
    select.value = value;
    $("token-days").value = value;
  }

  // --- messages ---------------------------------------------------------------------------

  function showMessage(kind, code, text, hint) {
    var box = $("message");
    box.textContent = "";
    box.className = "message " + kind;
    box.dataset.code = code || "";
    box.appendChild(el("strong", null, text));
    if (hint) box.appendChild(el("p", null, hint));
    box.hidden = false;
  }

  function hideMessage() {
    var box = $("message");
    box.hidden = true;
    box.textContent = "";
    box.dataset.code = "";
  }

  function explainError(status, body, token) {
    var error = (body && body.error) || {};
    if (status === 401) {
      return error.code === "token_invalid" || token
        ? ["auth", "token_invalid", "The insights token is not valid.",
           "It does not match the service's INSIGHTS_TOKEN. Check it and enter it again."]
        : ["auth", "token_required", "This page needs the insights token.",
           "The service has INSIGHTS_TOKEN set: enter it below, or open this page as " +
           "/insights#token=… (the token is only sent to this service, in a header)."];
    }
    if (status === 404 && error.code === "insights_off") {
      return ["info", error.code, "No insights: answers are not recorded.",
              "INSIGHTS_RETENTION_DAYS is 0 on this service. Set it (e.g. 90) to record them."];
    }
    if (status === 503) {
      return ["error", error.code || "unavailable", "No insights right now.",
              (error.message || "The service is unavailable.") + " Try again shortly."];
    }
    return ["error", error.code || "http_" + status, "The service answered " + status + ".",
            error.message || ""];
  }

  // --- charts -----------------------------------------------------------------------------

  // Drawn at the size they are shown (redrawn when the window is resized), so that their
  // text is the page's size on a phone and on a wide screen alike.
  var MIN_WIDTH = 240;
  var MARGIN = {top: 18, right: 14, bottom: 34};

  // Round axis steps: 1, 2, 2.5 or 5 times a power of ten; whole steps for counts.
  function scale(max, wholeNumbers) {
    if (!(max > 0)) max = wholeNumbers ? 4 : 1;
    var raw = max / 4;
    var magnitude = Math.pow(10, Math.floor(Math.log(raw) / Math.LN10));
    var norm = raw / magnitude;
    var step = (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 2.5 ? 2.5 : norm <= 5 ? 5 : 10) *
      magnitude;
    if (wholeNumbers) step = Math.max(1, Math.ceil(step));
    var count = Math.ceil(max / step - 1e-9);
    var values = [];
    for (var i = 0; i <= count; i++) values.push(Number((i * step).toPrecision(12)));
    return {top: count * step, values: values};
  }

  function chartWidth(node) {
    var width = Math.floor(node.getBoundingClientRect().width ||
                           (node.parentNode && node.parentNode.clientWidth) || 0);
    return Math.max(MIN_WIDTH, width);
  }

  // An empty chart of the shown width, titled; ``tickLabels``: the y axis's, to make room.
  function frame(node, title, description, height, tickLabels) {
    var width = chartWidth(node);
    node.textContent = "";
    node.setAttribute("viewBox", "0 0 " + width + " " + height);
    node.setAttribute("width", String(width));
    node.setAttribute("height", String(height));
    var titleNode = svg("title", {}, node);
    titleNode.textContent = title;
    var desc = svg("desc", {}, node);
    desc.textContent = description;
    node.setAttribute("aria-label", title + ". " + description);
    var longest = Math.max.apply(null, [1].concat((tickLabels || []).map(function (t) {
      return t.length;
    })));
    var left = Math.max(32, Math.round(longest * 6.6) + 12);
    return {
      x0: left, x1: width - MARGIN.right,
      y0: MARGIN.top, y1: height - MARGIN.bottom,
      width: width - left - MARGIN.right,
      height: height - MARGIN.top - MARGIN.bottom
    };
  }

  function yAxis(node, box, axis, labels) {
    var group = svg("g", {"class": "axis", "aria-hidden": "true"}, node);
    axis.values.forEach(function (value, i) {
      var y = box.y1 - (axis.top ? value / axis.top : 0) * box.height;
      svg("line", {x1: box.x0, x2: box.x1, y1: y, y2: y,
                   "class": value === 0 ? "baseline" : "grid"}, group);
      svgText(group, box.x0 - 6, y + 4, labels[i], "tick", "end");
    });
    return function (value) {
      return box.y1 - (axis.top ? Math.max(0, value) / axis.top : 0) * box.height;
    };
  }

  function empty(node, box, text) {
    svgText(node, box.x0 + box.width / 2, box.y0 + box.height / 2, text, "empty-note", "middle");
  }

  function mark(tag, attrs, parent, title) {
    var node = svg(tag, attrs, parent);
    var tip = svg("title", {}, node);
    tip.textContent = title;
    return node;
  }

  function seriesClass(index) { return "series-" + (index % SERIES); }

  // (a) Impressions per day, a bar per variant in each day.
  function drawImpressions(node, body) {
    var variants = body.variants;
    var dates = variants.length ? variants[0].days.map(function (d) { return d.date; }) : [];
    var max = 0;
    variants.forEach(function (v) {
      v.days.forEach(function (d) { max = Math.max(max, d.impressions || 0); });
    });
    var axis = scale(max, true);
    var ticks = axis.values.map(integer);
    var box = frame(node, "Impressions per day, by variant",
                    "Answers shown each day (UTC) from " + body.from + " to " + body.to + ".",
                    240, ticks);
    if (!variants.length) { empty(node, box, "No recommendations were shown."); return; }
    var y = yAxis(node, box, axis, ticks);
    var slot = box.width / dates.length;
    var group = slot * (dates.length > 45 ? 0.9 : 0.75);
    var bar = group / variants.length;
    var marks = svg("g", {"class": "marks"}, node);
    variants.forEach(function (v, i) {
      v.days.forEach(function (d, j) {
        var value = d.impressions || 0;
        var top = y(value);
        mark("rect", {
          x: (box.x0 + j * slot + (slot - group) / 2 + i * bar).toFixed(2),
          y: top.toFixed(2), width: Math.max(0.5, bar - (bar > 4 ? 1 : 0)).toFixed(2),
          height: (box.y1 - top).toFixed(2),
          "class": "mark bar " + seriesClass(i),
          "data-variant": v.variant, "data-date": d.date, "data-value": String(value)
        }, marks, v.variant + ", " + d.date + ": " + integer(value) +
          (value === 1 ? " impression" : " impressions"));
      });
    });
    var every = Math.ceil(dates.length / Math.max(2, Math.floor(box.width / 64)));
    var labels = svg("g", {"class": "axis", "aria-hidden": "true"}, node);
    dates.forEach(function (date, j) {
      if ((dates.length - 1 - j) % every !== 0) return; // the last day always has a label
      svgText(labels, box.x0 + (j + 0.5) * slot, box.y1 + 16, shortDate(date), "tick", "middle");
    });
  }

  function categories(node, box, variants) {
    var slot = box.width / variants.length;
    var labels = svg("g", {"class": "axis", "aria-hidden": "true"}, node);
    variants.forEach(function (v, i) {
      svgText(labels, box.x0 + (i + 0.5) * slot, box.y1 + 16, v.variant, "tick category",
              "middle");
    });
    return slot;
  }

  // (b) CTR per variant: a bar to the rate and an error bar over its 95 % interval.
  function drawCtr(node, body) {
    var variants = body.variants;
    var max = 0;
    variants.forEach(function (v) {
      if (v.ctr && isNumber(v.ctr.high)) max = Math.max(max, v.ctr.high);
    });
    var axis = scale(max, false);
    var ticks = axis.values.map(percent);
    var box = frame(node, "Click-through rate by variant",
                    "Share of answers with at least one click, with its 95 % Wilson interval.",
                    220, ticks);
    if (!variants.length) { empty(node, box, "No recommendations were shown."); return; }
    var y = yAxis(node, box, axis, ticks);
    var slot = categories(node, box, variants);
    var marks = svg("g", {"class": "marks"}, node);
    variants.forEach(function (v, i) {
      var centre = box.x0 + (i + 0.5) * slot;
      var rate = v.ctr || {};
      if (!isNumber(rate.value)) {
        svgText(marks, centre, box.y1 - 8, "no answers", "empty-note", "middle");
        return;
      }
      var g = mark("g", {
        "class": "mark " + seriesClass(i), "data-variant": v.variant,
        "data-value": String(rate.value), "data-low": String(rate.low),
        "data-high": String(rate.high)
      }, marks, v.variant + ": CTR " + percent(rate.value) + ", 95 % interval " +
        percent(rate.low) + " to " + percent(rate.high) + ", of " + integer(v.impressions) +
        " impressions");
      var width = Math.min(72, slot * 0.5);
      var top = y(rate.value);
      svg("rect", {x: (centre - width / 2).toFixed(2), y: top.toFixed(2), width: width.toFixed(2),
                   height: (box.y1 - top).toFixed(2), "class": "bar soft"}, g);
      var low = y(rate.low), high = y(rate.high), cap = Math.min(14, width / 3);
      svg("line", {x1: centre, x2: centre, y1: low.toFixed(2), y2: high.toFixed(2),
                   "class": "whisker"}, g);
      svg("line", {x1: centre - cap, x2: centre + cap, y1: low.toFixed(2), y2: low.toFixed(2),
                   "class": "whisker"}, g);
      svg("line", {x1: centre - cap, x2: centre + cap, y1: high.toFixed(2), y2: high.toFixed(2),
                   "class": "whisker"}, g);
      svg("circle", {cx: centre, cy: top.toFixed(2), r: 4, "class": "dot"}, g);
      svgText(g, centre + width / 2 + 4, top + 4, percent(rate.value), "value", "start");
    });
  }

  // (c) Revenue per 1,000 impressions, a bar per variant.
  function drawRevenue(node, body) {
    var variants = body.variants;
    var max = 0;
    variants.forEach(function (v) {
      if (isNumber(v.revenuePer1000)) max = Math.max(max, v.revenuePer1000);
    });
    var axis = scale(max, false);
    var ticks = axis.values.map(money);
    var box = frame(node, "Revenue per 1,000 impressions by variant",
                    "Revenue of the orders attributed to the recommendations, per 1,000 answers.",
                    220, ticks);
    if (!variants.length) { empty(node, box, "No recommendations were shown."); return; }
    var y = yAxis(node, box, axis, ticks);
    var slot = categories(node, box, variants);
    var marks = svg("g", {"class": "marks"}, node);
    variants.forEach(function (v, i) {
      var centre = box.x0 + (i + 0.5) * slot;
      if (!isNumber(v.revenuePer1000)) {
        svgText(marks, centre, box.y1 - 8, "no answers", "empty-note", "middle");
        return;
      }
      var width = Math.min(72, slot * 0.5);
      var top = y(v.revenuePer1000);
      mark("rect", {
        x: (centre - width / 2).toFixed(2), y: top.toFixed(2), width: width.toFixed(2),
        height: (box.y1 - top).toFixed(2), "class": "mark bar " + seriesClass(i),
        "data-variant": v.variant, "data-value": String(v.revenuePer1000)
      }, marks, v.variant + ": " + money(v.revenuePer1000) + " per 1,000 impressions (" +
        money(v.revenue) + " from " + integer(v.impressions) + " impressions)");
      svgText(marks, centre, top - 6, money(v.revenuePer1000), "value", "middle");
    });
  }

  // --- tables -----------------------------------------------------------------------------

  function legend(body) {
    var list = $("legend");
    list.textContent = "";
    body.variants.forEach(function (v, i) {
      var item = el("li", seriesClass(i));
      item.dataset.variant = v.variant;
      item.appendChild(el("span", "swatch"));
      item.appendChild(el("span", "name", v.variant));
      if (v.variant === body.baseline) item.appendChild(el("span", "tag", "baseline"));
      if (!v.configured) item.appendChild(el("span", "tag warn", "no longer configured"));
      list.appendChild(item);
    });
    list.hidden = !body.variants.length;
  }

  function cell(variant, field, value, text) {
    var td = el("td", null, text);
    td.dataset.variant = variant;
    td.dataset.field = field;
    td.dataset.value = isNumber(value) ? String(value) : "";
    return td;
  }

  // The rate, and its 95 % interval under it.
  function rateCell(variant, field, rate) {
    rate = rate || {};
    var td = cell(variant, field, rate.value, percent(rate.value));
    var range = interval(rate);
    if (range) {
      var small = el("small", "interval", range);
      small.title = "95 % interval";
      td.appendChild(small);
    }
    td.dataset.low = isNumber(rate.low) ? String(rate.low) : "";
    td.dataset.high = isNumber(rate.high) ? String(rate.high) : "";
    return td;
  }

  function figures(body) {
    var tbody = $("figures-body");
    tbody.textContent = "";
    body.variants.forEach(function (v, i) {
      var row = el("tr", seriesClass(i));
      row.dataset.variant = v.variant;
      var name = el("th");
      name.scope = "row";
      name.dataset.variant = v.variant;
      name.dataset.field = "variant";
      name.appendChild(el("span", "swatch"));
      name.appendChild(document.createTextNode(v.variant));
      row.appendChild(name);
      row.appendChild(cell(v.variant, "impressions", v.impressions, integer(v.impressions)));
      row.appendChild(cell(v.variant, "visitors", v.visitors, integer(v.visitors)));
      row.appendChild(cell(v.variant, "clicks", v.clicks, integer(v.clicks)));
      row.appendChild(rateCell(v.variant, "ctr", v.ctr));
      row.appendChild(rateCell(v.variant, "visitorClickRate", v.visitorClickRate));
      row.appendChild(cell(v.variant, "addToCarts", v.addToCarts, integer(v.addToCarts)));
      row.appendChild(rateCell(v.variant, "visitorAddRate", v.visitorAddRate));
      row.appendChild(cell(v.variant, "orders", v.orders, integer(v.orders)));
      row.appendChild(rateCell(v.variant, "visitorOrderRate", v.visitorOrderRate));
      row.appendChild(cell(v.variant, "revenue", v.revenue, money(v.revenue)));
      row.appendChild(cell(v.variant, "revenuePerVisitor", v.revenuePerVisitor,
                           money(v.revenuePerVisitor)));
      row.appendChild(cell(v.variant, "revenuePer1000", v.revenuePer1000,
                           money(v.revenuePer1000)));
      tbody.appendChild(row);
    });
    if (!body.variants.length) {
      var row = el("tr");
      var td = el("td", "empty", "No recommendations were shown in this period.");
      td.colSpan = 13;
      row.appendChild(td);
      tbody.appendChild(row);
    }
  }

  // A difference as people read it: percentage points for a share of visitors, money for
  // revenue per visitor.
  function difference(metric, x) {
    if (!isNumber(x)) return DASH;
    if (!MONEY_METRICS[metric]) return points(x);
    var sign = x > 0 ? "+" : x < 0 ? "−" : "±";
    return sign + money(Math.abs(x));
  }

  function measure(metric, x) {
    return MONEY_METRICS[metric] ? money(x) : percent(x);
  }

  // An interval's ends, signed, without the unit (the difference beside it has it).
  function range(metric, side) {
    if (!side || !isNumber(side.low) || !isNumber(side.high)) return DASH;
    var end = function (x) {
      var text = MONEY_METRICS[metric] ? money(Math.abs(x)) : oneDecimal.format(Math.abs(100 * x));
      return (x > 0 ? "+" : x < 0 ? "−" : "±") + text;
    };
    return end(side.low) + " to " + end(side.high);
  }

  function relative(x) {
    if (!isNumber(x)) return "";
    return (x > 0 ? "+" : x < 0 ? "−" : "±") + integerFormat.format(Math.abs(100 * x)) +
      NBSP + "%";
  }

  function comparisons(body) {
    var list = (body.comparisons || []).filter(function (c) { return c.sequential; });
    var tbody = $("comparisons-body");
    tbody.textContent = "";
    list.forEach(function (c) {
      var row = el("tr", c.sequential.discovery ? "significant" : null);
      row.dataset.variant = c.variant;
      row.dataset.metric = c.metric;
      var name = el("th", null, METRICS[c.metric] || c.metric);
      name.scope = "row";
      name.dataset.field = "metric";
      name.appendChild(el("small", "interval", c.variant + " vs " + c.baseline));
      row.appendChild(name);
      var change = cell(c.variant, "difference", c.difference, difference(c.metric, c.difference));
      var lift = relative(c.relativeDifference);
      if (lift) change.appendChild(el("small", "interval", lift));
      [cell(c.variant, "baselineValue", c.baselineValue, measure(c.metric, c.baselineValue)),
       cell(c.variant, "value", c.value, measure(c.metric, c.value)),
       change,
       intervalCell(c, "sequential"),
       cell(c.variant, "sequentialPValue", c.sequential.pValue, pValue(c.sequential.pValue)),
       cell(c.variant, "discovery", null, c.sequential.discovery ? "yes" : "no"),
       intervalCell(c, "fixed"),
       cell(c.variant, "fixedPValue", c.fixed.pValue, pValue(c.fixed.pValue))
      ].forEach(function (td) {
        td.dataset.metric = c.metric;
        row.appendChild(td);
      });
      row.querySelector("[data-field='discovery']").dataset.value =
        String(!!c.sequential.discovery);
      tbody.appendChild(row);
    });
    $("comparisons").hidden = !list.length;
    var analysis = body.analysis || {};
    $("comparisons-note").textContent = list.length
      ? integer(analysis.comparisons) + (analysis.comparisons === 1 ? " comparison" :
        " comparisons") + ": each variant against the baseline (" + body.baseline +
        ") on the share of visitors who clicked, added to the cart and ordered, and on " +
        "revenue per visitor. Always valid: the interval and p-value hold however often " +
        "this page is looked at (confidence sequences, tuned for " +
        integer(analysis.expectedVisitors) + " visitors: EXPERIMENT_EXPECTED_VISITORS); a " +
        "discovery survives Benjamini–Hochberg at a false-discovery rate of " +
        integer(100 * analysis.alpha) + NBSP + "% over all of them (" +
        integer(analysis.discoveries) + " now). Fixed sample: the z-test, valid only for " +
        "one look at a sample size planned in advance."
      : "Nothing to compare yet: one variant only, or no visitor did anything.";
  }

  function intervalCell(c, which) {
    var side = c[which] || {};
    var td = cell(c.variant, which + "Interval", null, range(c.metric, side));
    td.dataset.low = isNumber(side.low) ? String(side.low) : "";
    td.dataset.high = isNumber(side.high) ? String(side.high) : "";
    return td;
  }

  function sampleRatio(body) {
    var box = $("sample-ratio");
    var split = body.sampleRatio;
    box.textContent = "";
    box.dataset.mismatch = String(!!(split && split.mismatch));
    if (!split || !split.mismatch) {
      box.hidden = true;
      return;
    }
    box.appendChild(el("strong", null, "The comparison cannot be trusted: the split is off."));
    box.appendChild(el("p", null, split.warning));
    box.hidden = false;
  }

  // (d) Each comparison's difference with its two intervals, one row each, in two panels:
  // percentage points (the shares of visitors) and money (revenue per visitor).
  function drawIntervals(node, body, list) {
    var figure = $("intervals");
    figure.hidden = !list.length;
    if (!list.length) { node.textContent = ""; return; }
    var groups = [list.filter(function (c) { return !MONEY_METRICS[c.metric]; }),
                  list.filter(function (c) { return MONEY_METRICS[c.metric]; })]
      .filter(function (g) { return g.length; });
    var ROW = 26, GAP = 30;
    var several = list.some(function (c) { return c.variant !== list[0].variant; });
    var label = function (c) {
      return (several ? c.variant + ": " : "") + (SHORT[c.metric] || c.metric);
    };
    var LABEL = 16 + 7.2 * Math.max.apply(null, list.map(function (c) {
      return label(c).length;
    }));
    var height = MARGIN.top + groups.reduce(function (h, g) {
      return h + g.length * ROW + GAP;
    }, 0) + 4;
    var width = chartWidth(node);
    node.textContent = "";
    node.setAttribute("viewBox", "0 0 " + width + " " + height);
    node.setAttribute("width", String(width));
    node.setAttribute("height", String(height));
    svg("title", {}, node).textContent = "Differences from the baseline with their intervals";
    svg("desc", {}, node).textContent = "For each variant and measure, the difference from " +
      body.baseline + " as a dot, the always-valid 95 % interval as a thin line and the " +
      "fixed-sample 95 % interval (one planned look) as a thick one.";
    var left = Math.min(Math.round(LABEL), Math.round(width * 0.45));
    var x0 = left, x1 = width - MARGIN.right - 8;
    var top = MARGIN.top;
    var variants = body.variants.map(function (v) { return v.variant; });
    groups.forEach(function (group) {
      var money = !!MONEY_METRICS[group[0].metric];
      var reach = 0;
      group.forEach(function (c) {
        [c.sequential.low, c.sequential.high, c.fixed.low, c.fixed.high].forEach(function (x) {
          if (isNumber(x)) reach = Math.max(reach, Math.abs(x));
        });
      });
      reach = reach || 1;
      var x = function (value) { return x0 + (value + reach) / (2 * reach) * (x1 - x0); };
      var axis = svg("g", {"class": "axis", "aria-hidden": "true"}, node);
      var bottom = top + group.length * ROW;
      svg("line", {x1: x(0), x2: x(0), y1: top - 6, y2: bottom, "class": "baseline"}, axis);
      svgText(axis, x(0), bottom + 14, money ? "no difference (money a visitor)" :
              "no difference (percentage points)", "tick", "middle");
      svgText(axis, x0, bottom + 14, difference(group[0].metric, -reach), "tick", "start");
      svgText(axis, x1, bottom + 14, difference(group[0].metric, reach), "tick", "end");
      var marks = svg("g", {"class": "marks"}, node);
      group.forEach(function (c, i) {
        var y = top + i * ROW + ROW / 2;
        var g = mark("g", {
          "class": "mark " + seriesClass(Math.max(0, variants.indexOf(c.variant))) +
            (c.sequential.discovery ? " discovery" : ""),
          "data-variant": c.variant, "data-metric": c.metric
        }, marks, c.variant + ", " + (METRICS[c.metric] || c.metric) + ": " +
          difference(c.metric, c.difference) + "; always valid " + range(c.metric, c.sequential) +
          "; one planned look " + range(c.metric, c.fixed));
        svgText(g, x0 - 10, y + 4, label(c), "category", "end");
        svg("line", {x1: x(c.sequential.low).toFixed(2), x2: x(c.sequential.high).toFixed(2),
                     y1: y, y2: y, "class": "whisker sequential"}, g);
        svg("line", {x1: x(c.fixed.low).toFixed(2), x2: x(c.fixed.high).toFixed(2),
                     y1: y, y2: y, "class": "whisker fixed"}, g);
        svg("circle", {cx: x(c.difference).toFixed(2), cy: y, r: 4.5, "class": "dot"}, g);
      });
      top = bottom + GAP;
    });
  }

  function render(body) {
    var verdict = body.verdict || {};
    var node = $("verdict");
    node.textContent = verdict.text || "";
    node.dataset.enough = verdict.enough ? "true" : "false";
    node.dataset.leader = verdict.leader || "";
    node.className = "verdict " + (verdict.enough ? "enough" : "not-enough");
    $("range").textContent = body.from + " to " + body.to + " (UTC), " + body.days +
      (body.days === 1 ? " day" : " days");
    $("generated").textContent = "Generated at " + String(body.generatedAt || "")
      .replace("T", " ").replace("Z", " UTC") + ". Counts follow the events Segment delivers: " +
      "a click or order that arrives late is added when it does.";
    sampleRatio(body);
    legend(body);
    figures(body);
    comparisons(body);
    var report = $("report");
    report.hidden = false; // before drawing: the charts take the width they are shown at
    drawCharts(body);
    report.setAttribute("aria-busy", "false");
  }

  var drawn = null; // the report the charts show, to redraw at another width

  function drawCharts(body) {
    drawn = body;
    drawImpressions(document.querySelector("svg[data-chart='impressions']"), body);
    drawCtr(document.querySelector("svg[data-chart='ctr']"), body);
    drawRevenue(document.querySelector("svg[data-chart='revenue']"), body);
    drawIntervals(document.querySelector("svg[data-chart='intervals']"), body,
                  (body.comparisons || []).filter(function (c) { return c.sequential; }));
  }

  var resizing = 0;

  function redrawLater() {
    if (resizing || !drawn || $("report").hidden) return;
    resizing = window.requestAnimationFrame(function () {
      resizing = 0;
      var changed = Array.prototype.some.call(document.querySelectorAll("svg[data-chart]"),
        function (node) { return chartWidth(node) !== Number(node.getAttribute("width")); });
      if (drawn && changed) drawCharts(drawn);
    });
  }

  // --- loading ----------------------------------------------------------------------------

  var latest = 0;

  function load(address) {
    var ticket = ++latest;
    var headers = {"Accept": "application/json"};
    if (address.token) headers["Authorization"] = "Bearer " + address.token;
    showDays(address.days);
    document.body.dataset.state = "loading";
    $("report").setAttribute("aria-busy", "true");
    return fetch("/insights?days=" + address.days + "&format=json",
                 {headers: headers, cache: "no-store", credentials: "same-origin"})
      .then(function (response) {
        return response.json().catch(function () { return null; }).then(function (body) {
          if (ticket !== latest) return;
          if (!response.ok || !body || !Array.isArray(body.variants)) {
            var why = explainError(response.status, body, address.token);
            showMessage(why[0], why[1], why[2], why[3]);
            $("report").hidden = true;
            $("token-form").hidden = response.status !== 401;
            document.body.dataset.state = "error";
            return;
          }
          hideMessage();
          $("token-form").hidden = true;
          render(body);
          document.body.dataset.state = "ready";
        });
      })
      .catch(function () {
        if (ticket !== latest) return;
        showMessage("error", "unreachable", "Could not reach the service.",
                    "Check the connection and reload.");
        $("report").hidden = true;
        document.body.dataset.state = "error";
      });
  }

  function start() {
    takeTokenFromAddress();
    window.addEventListener("hashchange", function () {
      if (/(^#|&)token=/.test(window.location.hash)) {
        takeTokenFromAddress();
        load(readAddress());
      }
    });
    $("token-form").addEventListener("submit", function (event) {
      event.preventDefault();
      storeToken($("token").value.trim());
      load(readAddress());
    });
    var address = readAddress();
    $("days").addEventListener("change", function () {
      var params = new URLSearchParams(window.location.search);
      params.set("days", $("days").value);
      window.history.pushState(null, "", window.location.pathname + "?" + params.toString());
      load(readAddress());
    });
    $("period").addEventListener("submit", function (event) {
      event.preventDefault();
    });
    window.addEventListener("popstate", function () { load(readAddress()); });
    window.addEventListener("resize", redrawLater);
    return load(address);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
