// A minimal msgpack codec for the reconciliation frames (protocol/SPEC.md, "Reconciliation
// frames"): nil, booleans, integers, float64, strings, binary (Uint8Array), arrays and maps
// with string keys. Anything else is refused rather than guessed.

const utf8 = new TextEncoder();
const fromUtf8 = new TextDecoder('utf-8', { fatal: true });

export function encode(value) {
  const out = [];
  const bytes = (...b) => out.push(...b);
  const be = (n, size) => { for (let i = size - 1; i >= 0; i--) out.push(Math.floor(n / 2 ** (8 * i)) & 0xff); };
  const head = (len, fix, fixMax, codes) => {
    if (fix !== null && len <= fixMax) return bytes(fix | len);
    if (codes[0] !== null && len < 0x100) return bytes(codes[0], len);
    if (len < 0x10000) { bytes(codes[1]); return be(len, 2); }
    bytes(codes[2]);
    be(len, 4);
  };
  const put = (v) => {
    if (v === null || v === undefined) return bytes(0xc0);
    if (v === true || v === false) return bytes(v ? 0xc3 : 0xc2);
    if (typeof v === 'number') {
      if (Number.isInteger(v) && v >= 0 && v < 2 ** 32) {
        if (v < 0x80) return bytes(v);
        if (v < 0x100) return bytes(0xcc, v);
        if (v < 0x10000) { bytes(0xcd); return be(v, 2); }
        bytes(0xce);
        return be(v, 4);
      }
      if (Number.isInteger(v) && v < 0 && v >= -(2 ** 31)) {
        if (v >= -32) return bytes(v & 0xff);
        bytes(0xd2);
        return be(v >>> 0, 4);
      }
      const f = new DataView(new ArrayBuffer(8));
      f.setFloat64(0, v);
      return bytes(0xcb, ...new Uint8Array(f.buffer));
    }
    if (typeof v === 'string') {
      const b = utf8.encode(v);
      head(b.length, 0xa0, 31, [0xd9, 0xda, 0xdb]);
      return bytes(...b);
    }
    if (v instanceof Uint8Array) {
      head(v.length, null, 0, [0xc4, 0xc5, 0xc6]);
      return bytes(...v);
    }
    if (Array.isArray(v)) {
      head(v.length, 0x90, 15, [null, 0xdc, 0xdd]);
      return v.forEach(put);
    }
    if (typeof v === 'object') {
      const entries = Object.entries(v);
      head(entries.length, 0x80, 15, [null, 0xde, 0xdf]);
      return entries.forEach(([k, x]) => { put(k); put(x); });
    }
    throw new TypeError(`msgpack: cannot encode ${typeof v}`);
  };
  put(value);
  return new Uint8Array(out);
}

export function decode(buffer) {
  const b = new Uint8Array(buffer);
  const view = new DataView(b.buffer, b.byteOffset, b.byteLength);
  let at = 0;
  const need = (n) => { if (at + n > b.length) throw new Error('msgpack: truncated'); };
  const uint = (size) => { need(size); let n = 0; for (let i = 0; i < size; i++) n = n * 256 + b[at++]; return n; };
  const str = (n) => { need(n); const s = fromUtf8.decode(b.subarray(at, at + n)); at += n; return s; };
  const bin = (n) => { need(n); const s = b.slice(at, at + n); at += n; return s; };
  const arr = (n) => Array.from({ length: n }, get);
  const map = (n) => { const o = {}; for (let i = 0; i < n; i++) { const k = get(); o[k] = get(); } return o; };
  const get = () => {
    need(1);
    const c = b[at++];
    if (c < 0x80) return c;
    if (c >= 0xe0) return c - 0x100;
    if (c >= 0xa0 && c <= 0xbf) return str(c & 0x1f);
    if (c >= 0x90 && c <= 0x9f) return arr(c & 0x0f);
    if (c >= 0x80 && c <= 0x8f) return map(c & 0x0f);
    switch (c) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return bin(uint(1));
      case 0xc5: return bin(uint(2));
      case 0xc6: return bin(uint(4));
      case 0xca: { need(4); const v = view.getFloat32(at); at += 4; return v; }
      case 0xcb: { need(8); const v = view.getFloat64(at); at += 8; return v; }
      case 0xcc: return uint(1);
      case 0xcd: return uint(2);
      case 0xce: return uint(4);
      case 0xcf: return uint(8);
      case 0xd0: { need(1); return view.getInt8(at++); }
      case 0xd1: { need(2); const v = view.getInt16(at); at += 2; return v; }
      case 0xd2: { need(4); const v = view.getInt32(at); at += 4; return v; }
      case 0xd3: { need(8); const v = Number(view.getBigInt64(at)); at += 8; return v; }
      case 0xd9: return str(uint(1));
      case 0xda: return str(uint(2));
      case 0xdb: return str(uint(4));
      case 0xdc: return arr(uint(2));
      case 0xdd: return arr(uint(4));
      case 0xde: return map(uint(2));
      case 0xdf: return map(uint(4));
      default: throw new Error(`msgpack: unsupported type byte 0x${c.toString(16)}`);
    }
  };
  const value = get();
  if (at !== b.length) throw new Error('msgpack: trailing bytes');
  return value;
}
