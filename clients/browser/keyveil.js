// keyveil browser client: short-lived tokens, RFC 9421 signed proxy calls, no provider key.
//
//   import { KeyveilClient } from "./keyveil.js";
//   const kv = new KeyveilClient({ tokenUrl: "/api/voice-agent/secure-token" });
//   for await (const text of kv.chatText([{ role: "user", content: "hi" }])) show(text);
//   await kv.playSpeech("Hello", document.querySelector("audio"));
//   const voice = await kv.startVoice({ api: "live", voice: "marin", audio: audioElement,
//     onTranscript: (text) => show(text), onUsage: (u) => show(u.seconds) });
//   await voice.stop();
//   // with KEYVEIL_AUTH_MODE=oidc: new KeyveilClient({ getIdToken: () => auth.currentIdToken() })
//
// Dependency free: WebCrypto HMAC-SHA256 signs "@method" "@path" "content-digest"
// (RFC 9530 sha-256) with the per-token signing key; keyid is the token id. Voice is
// WebRTC straight to the provider; only the SDP offer goes through the keyveil proxy,
// which adds the key and the server-pinned session policy.

const TOKEN_PATH = "/api/voice-agent/secure-token";
const PROXY_API_PATH = "/api/voice-agent/proxy/v1";
const RETRY_STATUSES = new Set([429, 503]);
const encoder = new TextEncoder();

export class KeyveilError extends Error {
  constructor(status, code, message, retryAfterS = null) {
    super(`${status} ${code}: ${message}`);
    this.name = "KeyveilError";
    this.status = status;
    this.code = code;
    this.retryAfterS = retryAfterS;
  }
}

function base64(bytes) {
  let binary = "";
  for (const b of new Uint8Array(bytes)) binary += String.fromCharCode(b);
  return btoa(binary);
}

function base64UrlDecode(text) {
  const padded = text.replace(/-/g, "+").replace(/_/g, "/") + "===".slice((text.length + 3) % 4);
  return Uint8Array.from(atob(padded), (c) => c.charCodeAt(0));
}

function randomNonce() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return base64(bytes).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function sfString(value) {
  if (!/^[\x20-\x7e]*$/.test(value)) throw new Error("not a structured-field string");
  return `"${value.replace(/\\/g, "\\\\").replace(/"/g, '\\"')}"`;
}

/** `sha-256=:<base64>:` for the body bytes (RFC 9530). */
export async function contentDigest(body) {
  const digest = await crypto.subtle.digest("SHA-256", body);
  return `sha-256=:${base64(digest)}:`;
}

/**
 * Headers that sign a request (RFC 9421, hmac-sha256): Content-Digest, Signature-Input,
 * Signature. `key` is the raw HMAC key (bytes), `path` the absolute path as sent.
 */
export async function signRequest({ method, path, body, key, keyid, created, nonce }) {
  const bytes = body ?? new Uint8Array();
  const digest = await contentDigest(bytes);
  const params =
    `("@method" "@path" "content-digest");created=${created ?? Math.floor(Date.now() / 1000)}` +
    `;keyid=${sfString(keyid)};alg="hmac-sha256";nonce=${sfString(nonce ?? randomNonce())}`;
  const base = [
    `"@method": ${method.toUpperCase()}`,
    `"@path": ${path}`,
    `"content-digest": ${digest}`,
    `"@signature-params": ${params}`,
  ].join("\n");
  const hmacKey = await crypto.subtle.importKey(
    "raw",
    key,
    { name: "HMAC", hash: "SHA-256" },
    false,
    ["sign"],
  );
  const mac = await crypto.subtle.sign("HMAC", hmacKey, encoder.encode(base));
  return {
    "Content-Digest": digest,
    "Signature-Input": `sig1=${params}`,
    Signature: `sig1=:${base64(mac)}:`,
  };
}

/** Seconds from a Retry-After value (delta-seconds or HTTP-date), or null. */
export function parseRetryAfter(value) {
  if (!value) return null;
  if (/^\d+$/.test(value.trim())) return Number(value.trim());
  const when = Date.parse(value);
  return Number.isNaN(when) ? null : Math.max(0, (when - Date.now()) / 1000);
}

/** The `data` of each Server-Sent Event read from a fetch body. */
export async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let newline;
      while ((newline = buffer.search(/\r?\n/)) >= 0) {
        const line = buffer.slice(0, newline);
        buffer = buffer.slice(buffer[newline] === "\r" ? newline + 2 : newline + 1);
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        }
      }
    }
    if (data.length) yield data.join("\n");
  } finally {
    reader.releaseLock();
  }
}

async function errorFrom(response) {
  let code = `http_${response.status}`;
  let message = response.statusText || "error";
  try {
    const body = await response.json();
    if (body && typeof body.error === "object" && body.error) {
      code = String(body.error.code || body.error.type || code);
      message = String(body.error.message || message);
    }
  } catch {
    // not JSON: keep the status
  }
  return new KeyveilError(
    response.status,
    code,
    message,
    parseRetryAfter(response.headers.get("Retry-After")),
  );
}

export class KeyveilClient {
  constructor({
    tokenUrl = TOKEN_PATH,
    proxyUrl = null,
    mode = "proxy",
    scopes = null,
    session = null,
    refreshMarginS = 30,
    maxAttempts = 4,
    baseDelayMs = 250,
    maxDelayMs = 8000,
    maxRetryAfterS = 60,
    getIdToken = null, // async () => the app's login (OIDC ID token), sent as Bearer
  } = {}) {
    this.tokenUrl = tokenUrl;
    this.getIdToken = getIdToken;
    this.proxyUrl = proxyUrl;
    this.mode = mode;
    this.scopes = scopes;
    this.session = session;
    this.refreshMarginS = refreshMarginS;
    this.retry = { maxAttempts, baseDelayMs, maxDelayMs, maxRetryAfterS };
    this.tokenFetches = 0;
    this._token = null;
    this._pending = null;
  }

  _delayMs(attempt, retryAfterS) {
    if (attempt + 1 >= this.retry.maxAttempts) return null;
    const ceiling = Math.min(this.retry.maxDelayMs, this.retry.baseDelayMs * 2 ** attempt);
    const jitter = Math.random() * ceiling;
    if (retryAfterS === null || retryAfterS === undefined) return jitter;
    if (retryAfterS > this.retry.maxRetryAfterS) return null;
    return retryAfterS * 1000 + Math.min(jitter, this.retry.baseDelayMs);
  }

  /** Fetch with the retry rules: 429/503 (and failures to connect) only. */
  async _fetchRetrying(makeRequest, { retryNetworkErrors }) {
    for (let attempt = 0; ; attempt++) {
      let response;
      try {
        response = await makeRequest();
      } catch (error) {
        // fetch cannot tell "never sent" from "lost": only idempotent work is re-sent.
        const delay = retryNetworkErrors ? this._delayMs(attempt, null) : null;
        if (delay === null) throw error;
        await new Promise((resolve) => setTimeout(resolve, delay));
        continue;
      }
      if (!RETRY_STATUSES.has(response.status)) return response;
      const error = await errorFrom(response);
      const delay = this._delayMs(attempt, error.retryAfterS);
      if (delay === null) throw error;
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }

  _fresh(token) {
    if (!token) return false;
    const lifetime = token.lifetimeS;
    const remaining = token.obtainedAt / 1000 + lifetime - performance.now() / 1000;
    return remaining > Math.min(this.refreshMarginS, lifetime / 5);
  }

  /** A token for this client's mode, cached until it nears expiry or the login changes. */
  async requestToken({ force = false } = {}) {
    const login = this.getIdToken ? (await this.getIdToken()) || null : null;
    const sameLogin = !this.getIdToken || (this._token && this._token.login === login);
    if (!force && sameLogin && this._fresh(this._token)) return this._token;
    if (this._pending) return this._pending;
    this._pending = (async () => {
      const body = { mode: this.mode };
      if (this.scopes) body.scopes = this.scopes;
      if (this.session) body.session = this.session;
      const headers = { "Content-Type": "application/json" };
      if (login) headers.Authorization = `Bearer ${login}`;
      const response = await this._fetchRetrying(
        () =>
          fetch(this.tokenUrl, {
            method: "POST",
            headers,
            body: JSON.stringify(body),
            credentials: "same-origin",
          }),
        { retryNetworkErrors: true },
      );
      if (!response.ok) throw await errorFrom(response);
      const data = await response.json();
      const nowS = Date.now() / 1000;
      const lifetimeS =
        typeof data.expires_at === "number" ? Math.max(0, data.expires_at - nowS) : 60;
      this.tokenFetches += 1;
      this._token = {
        ...data,
        lifetimeS,
        obtainedAt: performance.now(),
        key: data.signing_key ? base64UrlDecode(data.signing_key) : null,
        login,
      };
      return this._token;
    })();
    try {
      return await this._pending;
    } finally {
      this._pending = null;
    }
  }

  _proxyBase(token) {
    const root = (this.proxyUrl || token.proxy_url || "").replace(/\/+$/, "");
    if (!root) throw new Error("no proxy URL: pass proxyUrl or use a token service that names one");
    return root.endsWith(PROXY_API_PATH) ? root : root + PROXY_API_PATH;
  }

  /** POST to a proxy endpoint, signed; retries 429/503, one new token on token_expired. */
  async _post(endpoint, body, contentType) {
    let refreshed = false;
    for (;;) {
      const token = await this.requestToken();
      if (!token.key) throw new Error(`a ${token.mode} token cannot sign proxy requests`);
      const url = new URL(`${this._proxyBase(token)}/${endpoint}`, location.href);
      const response = await this._fetchRetrying(
        async () => {
          const signed = await signRequest({
            method: "POST",
            path: url.pathname,
            body,
            key: token.key,
            keyid: token.token_id,
          });
          const headers = { ...signed, Authorization: `Bearer ${token.token}` };
          if (contentType) headers["Content-Type"] = contentType;
          return fetch(url, { method: "POST", headers, body, credentials: "omit" });
        },
        { retryNetworkErrors: false },
      );
      if (response.ok) return response;
      const error = await errorFrom(response);
      if (error.status === 401 && error.code === "token_expired" && !refreshed) {
        refreshed = true;
        this._token = null;
        continue;
      }
      throw error;
    }
  }

  /** A whole chat completion (JSON). */
  async chat(messages, { model = "gpt-4o-mini", ...params } = {}) {
    const body = encoder.encode(JSON.stringify({ model, messages, ...params }));
    return (await this._post("chat/completions", body, "application/json")).json();
  }

  /** Streamed chat completion chunks, as they arrive. */
  async *chatStream(messages, { model = "gpt-4o-mini", ...params } = {}) {
    const body = encoder.encode(JSON.stringify({ model, messages, ...params, stream: true }));
    const response = await this._post("chat/completions", body, "application/json");
    for await (const data of sseData(response.body)) {
      if (data.trim() === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) {
        throw new KeyveilError(502, chunk.error.code || "upstream_error", chunk.error.message);
      }
      yield chunk;
    }
  }

  /** Only the text deltas of a streamed chat completion. */
  async *chatText(messages, options = {}) {
    for await (const chunk of this.chatStream(messages, options)) {
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) yield choice.delta.content;
      }
    }
  }

  /** Text to speech: the audio as a Blob. */
  async speech(input, { voice = "alloy", model = "gpt-4o-mini-tts", format = "mp3" } = {}) {
    const body = encoder.encode(JSON.stringify({ model, voice, input, response_format: format }));
    return (await this._post("audio/speech", body, "application/json")).blob();
  }

  /** Speak `input` through an <audio> element; returns the blob URL it plays. */
  async playSpeech(input, audio, options = {}) {
    const blob = await this.speech(input, options);
    if (audio.src && audio.src.startsWith("blob:")) URL.revokeObjectURL(audio.src);
    audio.src = URL.createObjectURL(blob);
    try {
      await audio.play();
    } catch {
      // autoplay may be refused without a user gesture; the audio stays ready to play
    }
    return audio.src;
  }

  /**
   * A brokered voice session (see `connectVoice`): the offer is a signed POST to the
   * proxy's `live/sessions` (GPT-Live, JSON) or `realtime/calls` (Realtime, multipart).
   */
  async startVoice(options = {}) {
    return connectVoice({
      ...options,
      post: (endpoint, body, contentType) => this._post(endpoint, body, contentType),
    });
  }

  /** Speech to text from a Blob (multipart, signed over the exact bytes sent). */
  async transcribe(file, { model = "whisper-1", filename = "audio.webm" } = {}) {
    const form = new FormData();
    form.append("model", model);
    form.append("file", file, filename);
    // Serialise the form once so the digest covers exactly the bytes that are sent.
    const encoded = new Response(form);
    const contentType = encoded.headers.get("Content-Type");
    const body = new Uint8Array(await encoded.arrayBuffer());
    return (await this._post("audio/transcriptions", body, contentType)).json();
  }
}

// --- Voice ------------------------------------------------------------------------

const VOICE_CHANNEL = "oai-events";
const VOICE_READY = { live: "session.started", realtime: "session.created" };
const VOICE_TRANSCRIPT = {
  live: new Set(["session.output_transcript.delta"]),
  realtime: new Set(["response.output_audio_transcript.delta", "response.output_text.delta"]),
};

function iceGathered(pc, timeoutMs) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState !== "complete") return;
      pc.removeEventListener("icegatheringstatechange", done);
      clearTimeout(timer);
      resolve();
    };
    // Without a STUN server gathering ends fast; on timeout send what was gathered.
    const timer = setTimeout(() => {
      pc.removeEventListener("icegatheringstatechange", done);
      resolve();
    }, timeoutMs);
    pc.addEventListener("icegatheringstatechange", done);
  });
}

async function offerRequest(api, sdp, session) {
  if (api === "live") {
    const body = { session, transport: { type: "webrtc", sdp } };
    const bytes = encoder.encode(JSON.stringify(body));
    return { endpoint: "live/sessions", body: bytes, type: "application/json" };
  }
  // The Realtime unified interface: multipart with the SDP and the session JSON.
  const form = new FormData();
  form.append("sdp", sdp);
  form.append("session", JSON.stringify({ type: "realtime", ...session }));
  // Serialise once so the signature's digest covers exactly the bytes sent.
  const encoded = new Response(form);
  const type = encoded.headers.get("Content-Type");
  return { endpoint: "realtime/calls", body: new Uint8Array(await encoded.arrayBuffer()), type };
}

async function answerFrom(api, response) {
  if (api === "live") {
    const data = await response.json();
    return { id: data.session && data.session.id, sdp: data.transport && data.transport.sdp };
  }
  const location = response.headers.get("Location") || "";
  const id = response.headers.get("X-Keyveil-Call-Id") || location.split("/").pop() || null;
  return { id, sdp: await response.text() };
}

/**
 * The WebRTC dance of a voice agent: microphone track, `oai-events` data channel, offer
 * (ICE gathered), `post(endpoint, body, contentType)` to the broker, answer applied,
 * resolved once the provider says `session.started` (GPT-Live) or `session.created`
 * (Realtime). The returned session has `stop()` and reports through the callbacks:
 * `onTranscript(delta, event)`, `onUsage(usage, event)` (GPT-Live: cumulative billable
 * `seconds`; Realtime: token totals so far), `onClosed({reason, usage})`, `onEvent(event)`.
 */
export async function connectVoice({
  post,
  api = "live",
  model = null,
  voice = null,
  instructions = null,
  audio = null,
  microphone = null,
  rtcConfiguration = {},
  readyTimeoutMs = 15000,
  iceTimeoutMs = 3000,
  onTranscript = () => {},
  onUsage = () => {},
  onClosed = () => {},
  onEvent = () => {},
} = {}) {
  if (!VOICE_READY[api]) throw new Error(`api must be "live" or "realtime", not ${api}`);
  const session = {};
  if (model) session.model = model;
  if (instructions) session.instructions = instructions;
  if (voice) session.audio = { output: { voice } };

  const ownMicrophone = !microphone;
  const mic = microphone || (await navigator.mediaDevices.getUserMedia({ audio: true }));
  const pc = new RTCPeerConnection(rtcConfiguration);
  const remote = new MediaStream();
  let closed = null;
  let readyResolve;
  let readyReject;
  const ready = new Promise((resolve, reject) => {
    readyResolve = resolve;
    readyReject = reject;
  });
  ready.catch(() => {}); // a session that ends during set-up is reported by the set-up itself
  const tokens = { input_tokens: 0, output_tokens: 0, total_tokens: 0 };
  const state = {
    id: null,
    api,
    pc,
    transcript: "",
    seconds: 0,
    tokens,
    remoteStream: remote,
    get closed() {
      return closed;
    },
  };

  function finish(reason, usage = null) {
    if (closed) return;
    closed = { reason, usage };
    readyReject(new Error(`the voice session ended before it started (${reason})`));
    try {
      pc.close();
    } catch {
      // already closed
    }
    if (ownMicrophone) for (const track of mic.getTracks()) track.stop();
    onClosed(closed);
  }

  for (const track of mic.getAudioTracks()) pc.addTrack(track, mic);
  pc.addEventListener("track", (event) => {
    remote.addTrack(event.track);
    if (audio) {
      audio.srcObject = remote;
      audio.play().catch(() => {}); // autoplay may wait for a gesture; the stream stays set
    }
  });
  pc.addEventListener("connectionstatechange", () => {
    if (pc.connectionState === "failed" || pc.connectionState === "closed") {
      finish(pc.connectionState === "failed" ? "connection_lost" : "remote_hangup");
    }
  });

  const channel = pc.createDataChannel(VOICE_CHANNEL);
  channel.addEventListener("close", () => finish("remote_hangup"));
  channel.addEventListener("message", (message) => {
    let event;
    try {
      event = JSON.parse(message.data);
    } catch {
      return;
    }
    onEvent(event);
    if (event.type === VOICE_READY[api]) {
      readyResolve();
    } else if (VOICE_TRANSCRIPT[api].has(event.type)) {
      state.transcript += event.delta || "";
      onTranscript(event.delta || "", event);
    } else if (event.type === "session.usage.updated" && event.usage) {
      state.seconds = Number(event.usage.seconds) || 0;
      onUsage(event.usage, event);
    } else if (event.type === "response.done" && event.response && event.response.usage) {
      for (const key of Object.keys(tokens)) tokens[key] += event.response.usage[key] || 0;
      onUsage({ ...tokens }, event);
    } else if (event.type === "session.closed") {
      if (event.usage) state.seconds = Number(event.usage.seconds) || state.seconds;
      finish(event.reason || "closed", event.usage || null);
    }
  });

  try {
    await pc.setLocalDescription(await pc.createOffer());
    await iceGathered(pc, iceTimeoutMs);
    const request = await offerRequest(api, pc.localDescription.sdp, session);
    const response = await post(request.endpoint, request.body, request.type);
    const answer = await answerFrom(api, response);
    if (!answer.sdp) throw new Error("the voice broker answered without an SDP answer");
    state.id = answer.id;
    await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`no ${VOICE_READY[api]} within ${readyTimeoutMs} ms`)),
        readyTimeoutMs,
      );
    });
    try {
      await Promise.race([ready, timeout]);
    } finally {
      clearTimeout(timer);
    }
  } catch (error) {
    finish("setup_failed");
    throw error;
  }

  /** Inbound audio so far (RTP packets and bytes), from the peer connection's stats. */
  state.audioStats = async () => {
    let packets = 0;
    let bytes = 0;
    const stats = await pc.getStats();
    stats.forEach((report) => {
      if (report.type === "inbound-rtp" && report.kind === "audio") {
        packets += report.packetsReceived || 0;
        bytes += report.bytesReceived || 0;
      }
    });
    return { packets, bytes };
  };

  /** Send a client event on the data channel (what the provider allows the browser). */
  state.send = (event) => {
    if (channel.readyState !== "open") throw new Error("the voice session is not open");
    channel.send(JSON.stringify(event));
  };

  /** End the session: GPT-Live is asked to close (final usage), then the peer goes. */
  state.stop = async ({ waitMs = 1000 } = {}) => {
    if (closed) return closed;
    if (api === "live" && channel.readyState === "open") {
      channel.send(JSON.stringify({ type: "session.close" }));
      const deadline = performance.now() + waitMs;
      while (!closed && performance.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 25));
      }
    }
    finish("client_stopped");
    return closed;
  };
  return state;
}
