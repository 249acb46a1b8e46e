// The SDK's HTTP and websocket addresses of one anchor: its base URL, the API key it may
// need (`X-API-Key`, or the websocket subprotocol `api-key.<key>`, since a browser cannot
// set a websocket's headers), and anchor failures turned into the typed errors of errors.js.

import { AnchorUnreachable, anchorError } from './errors.js';
import { SUBPROTOCOL } from './protocol.js';

export class AnchorClient {
  constructor(base = location.origin, apiKey = null) {
    this.base = new URL(base, location.href);
    this.apiKey = apiKey;
  }

  url(path) {
    return new URL(path, this.base);
  }

  /** The websocket URL of `path` and the subprotocols to offer. */
  websocket(path) {
    const url = this.url(path);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    // The key rides beside the channel's own protocol, which the anchor always accepts: a browser
    // fails a handshake that names none of the protocols it offered.
    return { url, protocols: this.apiKey ? [SUBPROTOCOL, `api-key.${this.apiKey}`] : [SUBPROTOCOL] };
  }

  /**
   * fetch `path` with the key and, for a session's endpoints, its `token`; `json` is sent as
   * the body. Resolves to the Response when it is ok; throws AnchorUnreachable when nothing
   * answers and the typed error of the anchor's error body otherwise.
   */
  async request(path, { method = 'GET', json, token, headers = {}, signal } = {}) {
    const url = this.url(path);
    const h = { ...headers };
    if (this.apiKey) h['X-API-Key'] = this.apiKey;
    if (token) h.Authorization = `Bearer ${token}`;
    if (json !== undefined) h['Content-Type'] = 'application/json';
    let r;
    try {
      r = await fetch(url, { method, headers: h, body: json === undefined ? undefined : JSON.stringify(json), signal });
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      throw new AnchorUnreachable(`cannot reach the anchor at ${this.base.origin} (${e.message}); if the page is ` +
        'on another origin, it must be in the anchor\'s HPI_ALLOWED_ORIGINS', { url: url.href, cause: e });
    }
    if (r.ok) return r;
    let error;
    try { ({ error } = await r.json()); } catch { /* not JSON: a proxy's page */ }
    if (!error?.code && r.status >= 502) {
      throw new AnchorUnreachable(`the anchor at ${this.base.origin} is unavailable (HTTP ${r.status})`,
        { url: url.href, status: r.status });
    }
    throw anchorError(error?.code || `http_${r.status}`, error?.message || `${method} ${path}: HTTP ${r.status}`,
      { status: r.status, url: url.href, retryAfter: Number(r.headers.get('Retry-After')) || undefined });
  }

  async json(path, options) {
    return (await this.request(path, options)).json();
  }
}
