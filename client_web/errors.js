// The SDK's typed errors: one class per condition a page can act on, each with a stable
// `code`, so a page switches on `instanceof` (or `code`) and never parses a message.
// An error that came from the anchor keeps the anchor's own code in `anchorCode` and the
// HTTP status in `status`.

export class HPIError extends Error {
  static code = 'hpi_error';

  constructor(message, { cause, ...details } = {}) {
    super(message, { cause });
    this.name = this.constructor.name;
    this.code = this.constructor.code;
    Object.assign(this, details);
  }
}

/** No `navigator.gpu`, or no adapter: nothing can be drafted on this machine. */
export class WebGPUUnavailable extends HPIError {
  static code = 'webgpu_unavailable';
}

/** The adapter offers less than the engine needs; `limits`: [{name, needed, available}]. */
export class AdapterLimits extends HPIError {
  static code = 'adapter_limits';
}

/** The model pack does not fit the origin's storage; `needed` and `available` in bytes. */
export class QuotaExceeded extends HPIError {
  static code = 'quota_exceeded';
}

/** The anchor at `url` did not answer (network error, DNS, CORS refusal, anchor down). */
export class AnchorUnreachable extends HPIError {
  static code = 'anchor_unreachable';
}

/** The anchor no longer holds session `sessionId` (expired or deleted): start a new one. */
export class SessionExpired extends HPIError {
  static code = 'session_expired';
}

/**
 * The GPU device was lost. The engine restarts by itself from IndexedDB (no download);
 * `recovered` resolves once it can answer again (and rejects if it cannot).
 */
export class DeviceLost extends HPIError {
  static code = 'device_lost';
}

/** The anchor and the page disagree about the protocol: a bad frame, pack or count. */
export class ProtocolError extends HPIError {
  static code = 'protocol_error';
}

/** The anchor refused a request for another reason (`anchorCode`: rate_limited, bad_api_key, ...). */
export class AnchorRefused extends HPIError {
  static code = 'anchor_refused';
}

// Anchor codes that name a condition of their own.
const BY_ANCHOR_CODE = {
  session_not_found: SessionExpired,
  bad_frame: ProtocolError,
  sampling_mismatch: ProtocolError,
};

/** The typed error for an anchor's `{code, message}` (an HTTP error body or an error frame). */
export function anchorError(anchorCode, message, details = {}) {
  const Class = BY_ANCHOR_CODE[anchorCode] || AnchorRefused;
  return new Class(`anchor: ${anchorCode}: ${message}`, { anchorCode, ...details });
}
