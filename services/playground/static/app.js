// The playground page: chat with the served policy over the playground's same-origin API, rate
// the answers, watch the loop. Model output and every server string go into the page as text
// (textContent), never as HTML. The API key is sent once to /api/session and never kept here.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const STATUS_EVERY_MS = 3000;
  const KEPT_TURNS = 6; // earlier turns sent back with each question (user + chosen answer)

  const state = { history: [], pending: null, busy: false, timer: null };

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function randomKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function errorMessage(data, status) {
    if (data && data.error) {
      return typeof data.error === "string" ? data.error : data.error.message || `HTTP ${status}`;
    }
    return `HTTP ${status}`;
  }

  async function api(method, path, body) {
    const options = { method, headers: {}, credentials: "same-origin" };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    let reply;
    try {
      reply = await fetch(path, options);
    } catch (error) {
      return { ok: false, status: 0, message: "the playground did not answer" };
    }
    let data = null;
    try {
      data = await reply.json();
    } catch (error) {
      data = null;
    }
    if (reply.status === 401 && path !== "/api/session") showSignIn("Please sign in again.");
    return { ok: reply.ok, status: reply.status, data, message: errorMessage(data, reply.status) };
  }

  // -- signing in ------------------------------------------------------------------------------

  function showSignIn(message) {
    $("sign-in-form").hidden = false;
    $("ask-form").hidden = true;
    $("sign-out").hidden = true;
    $("sign-in-error").textContent = message || "";
    clearInterval(state.timer);
  }

  function showChat() {
    $("sign-in-form").hidden = true;
    $("ask-form").hidden = false;
    $("sign-out").hidden = false;
    $("prompt").focus();
    refreshStatus();
    clearInterval(state.timer);
    state.timer = setInterval(refreshStatus, STATUS_EVERY_MS);
  }

  async function signIn(event) {
    event.preventDefault();
    const field = $("api-key");
    const reply = await api("POST", "/api/session", { apiKey: field.value.trim() });
    field.value = "";
    if (reply.ok) showChat();
    else showSignIn(reply.message);
  }

  async function signOut() {
    await api("DELETE", "/api/session");
    showSignIn("");
  }

  // -- chatting --------------------------------------------------------------------------------

  function answerCard(parent, index, count) {
    const card = {
      index,
      node: el("article", "answer streaming"),
      text: el("p", "answer-text"),
      meta: el("div", "answer-meta"),
      actions: el("div", "actions"),
      status: el("p", "feedback-status"),
      generationId: "",
      deltas: 0,
      buttons: [],
    };
    card.node.dataset.index = String(index);
    card.node.append(card.text, card.meta, card.actions, card.status);
    const button = (label, className, onClick) => {
      const b = el("button", className, label);
      b.type = "button";
      b.disabled = true;
      b.addEventListener("click", () => onClick(b));
      card.actions.append(b);
      card.buttons.push(b);
      return b;
    };
    card.up = button("▲ Good", "thumb-up", (b) => thumb(card, "THUMB_UP", b));
    card.down = button("▼ Bad", "thumb-down", (b) => thumb(card, "THUMB_DOWN", b));
    button("✎ Write a better answer", "correct", () => openCorrection(card));
    if (count > 1) button("★ This one is better", "better", () => rank(card));
    parent.append(card.node);
    return card;
  }

  function finish(card, choice, chunk) {
    card.node.classList.remove("streaming");
    card.generationId = choice.generation_id || "";
    card.node.dataset.generationId = card.generationId;
    card.node.dataset.deltas = String(card.deltas);
    const version = el("span", "badge version", `policy v${choice.policy_version}`);
    const id = el("span", "generation-id", `id ${card.generationId.slice(0, 14)}…`);
    id.title = card.generationId;
    const reason = el("span", "finish", choice.finish_reason === "length" ? "cut at the length limit" : "");
    card.meta.append(version, id, reason);
    card.node.dataset.policyVersion = String(choice.policy_version);
    for (const b of card.buttons) b.disabled = !card.generationId;
    void chunk;
  }

  function fail(cards, message) {
    for (const card of cards) {
      if (!card.generationId) {
        card.node.classList.remove("streaming");
        card.status.classList.add("error");
        card.status.textContent = message;
      }
    }
  }

  async function readEvents(reply, cards) {
    const reader = reply.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    const handle = (data) => {
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        fail(cards, chunk.error.message || "generation failed");
        return;
      }
      for (const choice of chunk.choices || []) {
        const card = cards[choice.index];
        if (!card) continue;
        const content = choice.delta && choice.delta.content;
        if (content) {
          card.text.textContent += content;
          card.deltas += 1;
        }
        if (choice.finish_reason) finish(card, choice, chunk);
      }
    };
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ")) handle(line.slice(6));
        }
      }
    }
    fail(cards, "the answer stopped before it finished");
  }

  function commitPending() {
    // The previous turn joins the history with the answer the person preferred (or the first).
    const pending = state.pending;
    if (!pending) return;
    const chosen = pending.cards.find((c) => c.node.classList.contains("better")) || pending.cards[0];
    const answer = chosen.text.textContent;
    state.history.push({ role: "user", content: pending.prompt });
    if (answer) state.history.push({ role: "assistant", content: answer });
    state.history = state.history.slice(-2 * KEPT_TURNS);
    state.pending = null;
  }

  async function ask(event) {
    event.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt || state.busy) return;
    commitPending();
    const n = $("two-answers").checked ? 2 : 1;
    const turn = el("div", "turn");
    turn.append(el("div", "user", prompt));
    const answers = el("div", n > 1 ? "answers two" : "answers");
    turn.append(answers);
    $("conversation").append(turn);
    const cards = [];
    for (let i = 0; i < n; i += 1) cards.push(answerCard(answers, i, n));
    for (const card of cards) card.siblings = cards;
    state.pending = { prompt, cards };
    $("prompt").value = "";
    state.busy = true;
    $("send").disabled = true;
    try {
      const messages = state.history.concat([{ role: "user", content: prompt }]);
      const reply = await fetch("/api/chat", {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ messages, n }),
      });
      if (!reply.ok) {
        let data = null;
        try {
          data = await reply.json();
        } catch (error) {
          data = null;
        }
        fail(cards, errorMessage(data, reply.status));
        if (reply.status === 401) showSignIn("Please sign in again.");
      } else {
        await readEvents(reply, cards);
      }
    } catch (error) {
      fail(cards, "the playground did not answer");
    } finally {
      state.busy = false;
      $("send").disabled = false;
      turn.scrollIntoView({ block: "end", behavior: "smooth" });
    }
  }

  function newChat() {
    state.history = [];
    state.pending = null;
    $("conversation").replaceChildren();
    $("prompt").focus();
  }

  // -- feedback --------------------------------------------------------------------------------

  async function sendFeedback(card, signal, label) {
    card.status.classList.remove("error");
    card.status.textContent = "sending…";
    const body = Object.assign({ generationId: card.generationId, idempotencyKey: randomKey() }, signal);
    const reply = await api("POST", "/api/feedback", body);
    if (reply.ok) {
      card.status.textContent = `${label} stored`;
      card.node.dataset.feedbackEvent = reply.data.eventId;
    } else {
      card.status.classList.add("error");
      card.status.textContent = `not stored: ${reply.message}`;
    }
    return reply.ok;
  }

  async function thumb(card, value, button) {
    card.up.disabled = true;
    card.down.disabled = true;
    const ok = await sendFeedback(card, { thumb: value }, value === "THUMB_UP" ? "thumbs-up" : "thumbs-down");
    if (ok) button.classList.add("chosen");
    else {
      card.up.disabled = false;
      card.down.disabled = false;
    }
  }

  async function rank(best) {
    const others = best.siblings.filter((c) => c !== best && c.generationId);
    if (!others.length) return;
    const ids = [best.generationId, ...others.map((c) => c.generationId)];
    for (const card of best.siblings) {
      card.node.classList.toggle("better", card === best);
      for (const b of card.buttons) if (b.classList.contains("better")) b.disabled = true;
    }
    await sendFeedback(best, { ranking: { generationIds: ids } }, "ranking");
  }

  function openCorrection(card) {
    if (card.correction) {
      card.correction.querySelector("textarea").focus();
      return;
    }
    const form = el("form", "correction");
    const area = el("textarea");
    area.rows = 3;
    area.maxLength = 8000;
    area.placeholder = "A better answer";
    area.value = card.text.textContent;
    const submit = el("button", "send-correction", "Send correction");
    submit.type = "submit";
    form.append(area, submit);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const text = area.value.trim();
      if (!text) return;
      submit.disabled = true;
      const ok = await sendFeedback(card, { correction: { text } }, "correction");
      if (ok) form.remove();
      else submit.disabled = false;
      card.correction = ok ? null : form;
    });
    card.correction = form;
    card.node.append(form);
    area.focus();
  }

  // -- the panel -------------------------------------------------------------------------------

  function percent(rate) {
    return `${Math.round(rate * 100)}%`;
  }

  function renderStatus(status) {
    const policy = status.policy;
    $("panel-policy").textContent = policy ? `v${policy.version} · ${policy.model}` : "not answering";
    const reward = status.rewardModel;
    const rounds = reward ? `${reward.step} training round${reward.step === 1 ? "" : "s"}` : "";
    $("panel-reward").textContent = reward ? `v${reward.rewardVersion} · ${rounds}` : "-";
    const trainer = status.trainer;
    $("panel-trainer").textContent = trainer
      ? `step ${trainer.step} · published v${trainer.policyVersion}${trainer.paused ? " · paused" : ""}`
      : "not answering";
    const phase = trainer && trainer.phase ? trainer.phase + (trainer.phaseDetail ? ` — ${trainer.phaseDetail}` : "") : "";
    $("panel-phase").textContent = phase;
    $("panel-phase").hidden = !phase;
    $("panel-phase-label").hidden = !phase;
    const feedback = status.feedback || {};
    const perMinute = typeof feedback.perMinute === "number" ? ` · ${feedback.perMinute.toFixed(1)} / min` : "";
    $("panel-feedback").textContent = typeof feedback.total === "number" ? `${feedback.total} stored${perMinute}` : "-";
    const rows = (status.versions || []).map((row) => {
      const item = el("li", policy && row.version === policy.version ? "served" : "");
      const bar = el("div", "bar");
      const fill = el("span");
      fill.style.width = percent(row.upRate || 0);
      bar.append(fill);
      item.append(el("span", "version", `v${row.version}`), bar, el("span", "rate", `${percent(row.upRate || 0)} of ${row.thumbs}`));
      item.dataset.version = String(row.version);
      item.dataset.thumbs = String(row.thumbs);
      return item;
    });
    $("trend").replaceChildren(...rows);
    $("trend-empty").hidden = rows.length > 0;
    const missing = (status.missing || []).filter((name) => name !== "not asked yet");
    $("panel-missing").textContent = missing.length ? `not answering: ${missing.join(", ")}` : "";
  }

  async function refreshStatus() {
    const reply = await api("GET", "/api/status");
    if (reply.ok) renderStatus(reply.data);
  }

  // -- start -----------------------------------------------------------------------------------

  async function start() {
    $("sign-in-form").addEventListener("submit", signIn);
    $("sign-out").addEventListener("click", signOut);
    $("ask-form").addEventListener("submit", ask);
    $("new-chat").addEventListener("click", newChat);
    $("prompt").addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !event.shiftKey) {
        event.preventDefault();
        $("ask-form").requestSubmit();
      }
    });
    const session = await api("GET", "/api/session");
    if (session.ok && session.data.signedIn) showChat();
    else showSignIn("");
  }

  window.rlhfPlayground = { renderStatus };
  document.addEventListener("DOMContentLoaded", start);
})();
