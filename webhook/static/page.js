// The page at GET /: who to ask for, /healthz, /recommendations, rendered as cards.
// No framework, no build step. Data from the service is only ever set with textContent
// or as attribute values that were checked (URLs), never parsed as HTML.
"use strict";

(function () {
  var DEFAULT_RESULTS = 12;

  function $(id) { return document.getElementById(id); }

  function el(tag, className, text) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // Segment's analytics.js keeps the anonymous id in a cookie, JSON-encoded (a quoted
  // string), often percent-encoded too: ajs_anonymous_id=%22abc%22 or "abc" or abc.
  function cookieValue(name) {
    var parts = document.cookie ? document.cookie.split(";") : [];
    for (var i = 0; i < parts.length; i++) {
      var pair = parts[i].trim();
      var eq = pair.indexOf("=");
      if (eq < 0 || pair.slice(0, eq) !== name) continue;
      return parseSegmentId(pair.slice(eq + 1));
    }
    return null;
  }

  function parseSegmentId(raw) {
    var value = raw;
    try { value = decodeURIComponent(value); } catch (e) { /* keep it as it is */ }
    value = value.trim();
    if (value.charAt(0) === '"') {
      try {
        var parsed = JSON.parse(value);
        value = typeof parsed === "string" ? parsed : "";
      } catch (e) {
        value = value.replace(/^"+|"+$/g, "");
      }
    }
    value = value.trim();
    return value && value !== "null" && value !== "undefined" ? value : null;
  }

  // Only web addresses become links or images (no javascript: or other schemes).
  function safeUrl(raw, forImage) {
    if (typeof raw !== "string" || !raw) return null;
    if (forImage && /^data:image\/(png|gif|jpe?g|webp|svg\+xml|avif)[;,]/i.test(raw)) return raw;
    try {
      var url = new URL(raw, window.location.href);
      return url.protocol === "https:" || url.protocol === "http:" ? url.href : null;
    } catch (e) {
      return null;
    }
  }

  // The shop's product page can send the answer's id back with its Product Clicked or
  // Product Viewed event (properties.recommendation_id): the click is then attributed to
  // this answer (GET /insights).
  function withRecommendationId(href, recommendationId) {
    if (!href || !recommendationId) return href;
    try {
      var url = new URL(href);
      if (url.protocol !== "https:" && url.protocol !== "http:") return href;
      url.searchParams.set("recommendation_id", String(recommendationId));
      return url.href;
    } catch (e) {
      return href;
    }
  }

  // With Segment's analytics.js on the page, a click on a card is tracked as the spec's
  // Product Clicked, naming the answer it came from.
  function trackClick(item, index, answer) {
    var analytics = window.analytics;
    if (!analytics || typeof analytics.track !== "function") return;
    try {
      analytics.track("Product Clicked", {product_id: item.itemId, position: index + 1,
                                          recommendation_id: answer.recommendationId});
    } catch (e) { /* tracking never stops the click */ }
  }

  function formatPrice(price) {
    if (price === undefined || price === null || price === "") return "";
    var number = typeof price === "number" ? price : Number(price);
    if (typeof price !== "number" && (String(price).trim() === "" || isNaN(number))) {
      return String(price);
    }
    return number.toLocaleString(undefined, {minimumFractionDigits: 2, maximumFractionDigits: 2});
  }

  function showMessage(kind, text, hint) {
    var box = $("message");
    box.textContent = "";
    box.className = "message " + kind;
    box.appendChild(el("strong", null, text));
    if (hint) box.appendChild(el("p", null, hint));
    box.hidden = false;
  }

  // --- health -----------------------------------------------------------------------

  function pill(text, kind, title) {
    var item = el("li", "pill " + (kind || ""), text);
    if (title) item.title = title;
    return item;
  }

  // The status is public (GET /healthz); what runs comes with the page itself. The
  // operator's details (lag, warnings, configuration) need METRICS_TOKEN and are not
  // asked for here.
  function loadHealth() {
    var list = $("health");
    var mode = document.body.dataset.mode || "";
    var recommender = document.body.dataset.recommender || "";
    var tokens = document.body.dataset.tokensRequired === "true";
    function describe(status) {
      list.textContent = "";
      list.appendChild(pill(status === "ok" ? "healthy" : status === "unknown"
                            ? "health unknown" : "unhealthy",
                            status === "ok" ? "ok" : "bad", "GET /healthz: " + status));
      if (mode) list.appendChild(pill("mode: " + mode, "", "where Segment's events go"));
      if (recommender) {
        list.appendChild(pill("recommender: " + recommender, "",
                              "who answers /recommendations"));
      }
      list.appendChild(pill(tokens ? "tokens required" : "no tokens", "",
                            "SECRET_KEY " + (tokens ? "is" : "is not") + " set"));
    }
    return fetch("/healthz", {headers: {"Accept": "application/json"}, cache: "no-store"})
      .then(function (response) { return response.json(); })
      .then(function (health) { describe(health.status || "unknown"); })
      .catch(function () { describe("unknown"); });
  }

  // --- recommendations --------------------------------------------------------------

  var ERRORS = {
    token_required: ["A token is required to see recommendations.",
      "This service has SECRET_KEY set. Ask the shop's backend for a token for this visitor " +
      "(for example: flask --app webhook token {command}) and paste it in the Token field."],
    token_invalid: ["The token is not valid.",
      "It was not made with this service's SECRET_KEY, or it was cut short. Mint a new one."],
    token_expired: ["The token has expired.",
      "Tokens last TOKEN_MAX_AGE_SECONDS. Mint a new one for this visitor."],
    token_forbidden: ["The token belongs to another visitor.",
      "A token is bound to one userId or anonymousId: mint one for this visitor."]
  };

  function explainError(status, body, visitor) {
    var error = (body && body.error) || {};
    var known = ERRORS[error.code];
    if (known) {
      var command = (visitor.param === "anonymousId" ? "--anonymous " : "") +
        (/^[A-Za-z0-9._@:-]+$/.test(visitor.id) ? visitor.id : "'" + visitor.id + "'");
      return [known[0], known[1].replace("{command}", command)];
    }
    if (status === 401 || status === 403) {
      return ["Not allowed (" + status + ").", error.message || "A valid token is needed."];
    }
    if (status === 503) {
      return ["No recommendations right now.",
              (error.message || "The service is unavailable.") + " Try again shortly."];
    }
    return ["The service answered " + status + ".", error.message || ""];
  }

  var REASONS = {
    recent_purchase: "bought already (an Order Completed event)",
    seed_item: "the item the list is about"
  };

  function renderAnswer(answer) {
    $("recommendation-id").textContent = answer.recommendationId || "";
    $("source").textContent = answer.source || "";

    var notes = $("notes");
    notes.textContent = "";
    if (answer.optedOut) {
      notes.appendChild(el("li", null,
        "This visitor opted out of personalization: these are popular items."));
    } else if (answer.source === "popular" && (answer.degraded || {}).consent) {
      notes.appendChild(el("li", null,
        "Popular items: the visitor's consent could not be checked right now."));
    } else if (answer.source === "popular") {
      notes.appendChild(el("li", null,
        "Popular items: nothing personal to recommend for this visitor yet."));
    }
    var degraded = answer.degraded || {};
    Object.keys(degraded).forEach(function (part) {
      notes.appendChild(el("li", "warn", "Degraded: " + part + ": " + degraded[part]));
    });
    notes.hidden = !notes.childNodes.length;

    var cards = $("cards");
    var template = $("card-template");
    cards.textContent = "";
    (answer.itemList || []).forEach(function (item, index) {
      var card = template.content.firstElementChild.cloneNode(true);
      card.dataset.itemId = item.itemId;
      card.dataset.position = String(index + 1);
      var link = card.querySelector(".card-link");
      var href = withRecommendationId(safeUrl(item.url, false), answer.recommendationId);
      if (href) {
        link.href = href;
        link.rel = "noopener noreferrer";
      }
      link.addEventListener("click", function () {
        trackClick(item, index, answer);
      });
      var imageBox = card.querySelector(".card-image");
      var src = safeUrl(item.image_url, true);
      var label = item.name || item.itemId;
      if (src) {
        var image = document.createElement("img");
        image.alt = label;
        image.loading = "lazy";
        image.referrerPolicy = "no-referrer";
        image.addEventListener("error", function () {
          imageBox.textContent = "";
          imageBox.appendChild(el("span", "initial", String(label).charAt(0).toUpperCase()));
        });
        image.src = src;
        imageBox.appendChild(image);
      } else {
        imageBox.appendChild(el("span", "initial", String(label).charAt(0).toUpperCase()));
      }
      card.querySelector(".card-name").textContent = item.name || item.itemId;
      var price = formatPrice(item.price);
      var priceNode = card.querySelector(".card-price");
      if (price) priceNode.textContent = price; else priceNode.remove();
      var idNode = card.querySelector(".card-id");
      if (item.name) idNode.textContent = item.itemId; else idNode.remove();
      cards.appendChild(card);
    });
    $("empty").hidden = (answer.itemList || []).length > 0;

    // What the trait checks removed, and with which traits: the visitor's own data,
    // in the answer only with a token for their userId.
    var disclosed = Object.prototype.hasOwnProperty.call(answer, "filtered");
    var filtered = answer.filtered || {count: 0, reasons: {}};
    var reasons = filtered.reasons || {};
    var list = $("filtered");
    list.textContent = "";
    $("filtered-summary").textContent = !disclosed
      ? "Shown only with a token for this userId."
      : filtered.count
        ? filtered.count + (filtered.count === 1 ? " item was" : " items were") + " left out:"
        : "Nothing was removed.";
    Object.keys(reasons).forEach(function (reason) {
      var item = el("li");
      item.dataset.reason = reason;
      item.appendChild(el("code", null, reason));
      item.appendChild(document.createTextNode(
        " × " + reasons[reason] + ": " + (REASONS[reason] || "listed in the visitor's \"" +
        reason + "\" trait")));
      list.appendChild(item);
    });

    var names = Array.isArray(answer.traitsUsed) ? answer.traitsUsed : [];
    var values = answer.traitValues || {};
    var traitList = $("traits");
    traitList.textContent = "";
    $("traits-summary").textContent = !disclosed
      ? "Shown only with a token for this userId."
      : names.length ? "From the visitor's profile:" : "No traits were known for this visitor.";
    names.forEach(function (name) {
      var row = el("div");
      row.dataset.trait = name;
      row.appendChild(el("dt", null, name));
      row.appendChild(el("dd", null, Object.prototype.hasOwnProperty.call(values, name)
                                     ? JSON.stringify(values[name]) : ""));
      traitList.appendChild(row);
    });

    $("answer").hidden = false;
  }

  function loadRecommendations(visitor, token, numResults) {
    var query = new URLSearchParams();
    query.set(visitor.param, visitor.id);
    query.set("numResults", String(numResults));
    var headers = {"Accept": "application/json"};
    if (token) headers["Authorization"] = "Bearer " + token;
    document.body.dataset.state = "loading";
    return fetch("/recommendations?" + query.toString(), {headers: headers, cache: "no-store"})
      .then(function (response) {
        return response.json().catch(function () { return null; }).then(function (body) {
          if (!response.ok) {
            var text = explainError(response.status, body, visitor);
            showMessage(response.status === 401 || response.status === 403 ? "auth" : "error",
                        text[0], text[1]);
            $("message").dataset.code = (body && body.error && body.error.code) || "";
            document.body.dataset.state = "error";
            return;
          }
          renderAnswer(body);
          document.body.dataset.state = "ready";
        });
      })
      .catch(function () {
        showMessage("error", "Could not reach the service.", "Check the connection and reload.");
        document.body.dataset.state = "error";
      });
  }

  // A visitor's token never travels in the address (addresses end up in logs, proxies and
  // browser history): it comes from the Token field or the fragment (#token=…, which no
  // request carries), is kept for this tab in sessionStorage, and the address is cleaned.
  var TOKEN_KEY = "segment-personalize.token:";

  function storedToken(visitorKey) {
    try { return window.sessionStorage.getItem(TOKEN_KEY + visitorKey) || ""; }
    catch (e) { return ""; }
  }

  function storeToken(visitorKey, token) {
    try {
      if (token) window.sessionStorage.setItem(TOKEN_KEY + visitorKey, token);
      else window.sessionStorage.removeItem(TOKEN_KEY + visitorKey);
    } catch (e) { /* storage refused: the token lasts as long as the page */ }
  }

  function takeTokenFromAddress(params) {
    var fragment = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    var token = (fragment.get("token") || params.get("token") || "").trim();
    if (fragment.has("token") || params.has("token")) {
      params.delete("token");
      var clean = window.location.pathname + (params.toString() ? "?" + params.toString() : "");
      window.history.replaceState(null, "", clean);
    }
    return token;
  }

  function watchForm() {
    $("visitor").addEventListener("submit", function (event) {
      event.preventDefault();
      var userId = $("userId").value.trim();
      var token = $("token").value.trim();
      if (userId) storeToken("userId:" + userId, token);
      window.location.assign("/" + (userId ? "?userId=" + encodeURIComponent(userId) : ""));
    });
  }

  function start() {
    watchForm();
    // A link with #token= opened over this page only changes the fragment: load again.
    window.addEventListener("hashchange", function () {
      if (/(^#|&)token=/.test(window.location.hash)) window.location.reload();
    });
    var params = new URLSearchParams(window.location.search);
    var fromAddress = takeTokenFromAddress(params);
    var userId = (params.get("userId") || "").trim();
    var anonymousId = (params.get("anonymousId") || "").trim();
    var visitorKey = userId ? "userId:" + userId : anonymousId ? "anonymousId:" + anonymousId : "";
    if (fromAddress && visitorKey) storeToken(visitorKey, fromAddress);
    var token = fromAddress || (visitorKey ? storedToken(visitorKey) : "");
    var numResults = parseInt(params.get("numResults") || "", 10);
    if (!(numResults >= 1 && numResults <= 100)) numResults = DEFAULT_RESULTS;

    $("userId").value = userId;
    $("token").value = token;
    if (document.body.dataset.tokensRequired !== "true" && !token) {
      $("token-label").classList.add("optional");
    }

    var visitor = null;
    var who = $("who");
    if (userId) {
      visitor = {param: "userId", id: userId};
      who.textContent = "For userId ";
    } else if (anonymousId) {
      visitor = {param: "anonymousId", id: anonymousId};
      who.textContent = "For anonymousId ";
    } else {
      var cookieId = cookieValue("ajs_anonymous_id");
      if (cookieId) {
        visitor = {param: "anonymousId", id: cookieId};
        who.textContent = "For this browser's Segment anonymousId ";
      }
    }
    if (visitor) {
      who.appendChild(el("code", null, visitor.id));
      who.dataset.param = visitor.param;
      who.dataset.visitor = visitor.id;
    }

    var health = loadHealth();
    if (!visitor) {
      who.textContent = "";
      showMessage("info", "Enter a user id to see what the service recommends.",
                  "Or open /?userId=… directly. With Segment's analytics.js on this site, " +
                  "the visitor's anonymous id is used.");
      document.body.dataset.state = "idle";
      return health;
    }
    return Promise.all([health, loadRecommendations(visitor, token, numResults)]);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
