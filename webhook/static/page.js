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

  function loadHealth() {
    var list = $("health");
    return fetch("/healthz", {headers: {"Accept": "application/json"}, cache: "no-store"})
      .then(function (response) { return response.json(); })
      .then(function (health) {
        var configured = health.configured || {};
        list.textContent = "";
        list.appendChild(pill(health.status === "ok" ? "healthy" : "unhealthy",
                              health.status === "ok" ? "ok" : "bad", "status: " + health.status));
        list.appendChild(pill("mode: " + health.mode, "", "where Segment's events go"));
        if (configured.recommender) {
          list.appendChild(pill("recommender: " + configured.recommender, "",
                                "who answers /recommendations"));
        }
        list.appendChild(pill("store: " + health.store, health.store === "ok" ? "ok" : "bad"));
        list.appendChild(pill(health.signatures_enforced ? "signatures enforced"
                                                         : "signatures not enforced",
                              health.signatures_enforced ? "ok" : "warn"));
        list.appendChild(pill(configured.tokens_required ? "tokens required" : "no tokens",
                              "", "SECRET_KEY " + (configured.tokens_required ? "is" : "is not") +
                              " set"));
        var warnings = $("warnings");
        warnings.textContent = "";
        (health.warnings || []).forEach(function (warning) {
          warnings.appendChild(el("li", null, warning));
        });
        warnings.hidden = !(health.warnings || []).length;
      })
      .catch(function () {
        list.textContent = "";
        list.appendChild(pill("health unknown", "bad", "GET /healthz failed"));
      });
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

    var filtered = answer.filtered || {count: 0, reasons: {}};
    var reasons = filtered.reasons || {};
    var list = $("filtered");
    list.textContent = "";
    $("filtered-summary").textContent = filtered.count
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

    // Which traits were used, and how many items each removed. Their values only come
    // with the visitor's token (traitValues); without one the service never sends them.
    var names = Array.isArray(answer.traitsUsed) ? answer.traitsUsed : [];
    var values = answer.traitValues || null;
    var traitList = $("traits");
    traitList.textContent = "";
    $("traits-summary").textContent = !names.length
      ? "No traits were known for this visitor."
      : values ? "From the visitor's profile:"
               : "From the visitor's profile (values are shown only with the visitor's token):";
    names.forEach(function (name) {
      var row = el("div");
      row.dataset.trait = name;
      row.appendChild(el("dt", null, name));
      if (values && Object.prototype.hasOwnProperty.call(values, name)) {
        row.appendChild(el("dd", null, JSON.stringify(values[name])));
      } else {
        var removed = reasons[name] || 0;
        row.appendChild(el("dd", "hidden-value",
          removed ? "removed " + removed + (removed === 1 ? " item" : " items") : "used"));
      }
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

  function start() {
    var params = new URLSearchParams(window.location.search);
    var userId = (params.get("userId") || "").trim();
    var anonymousId = (params.get("anonymousId") || "").trim();
    var token = (params.get("token") || "").trim();
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
