"""client_web/store.js in headless Chromium: packs, holograms and sessions in IndexedDB,
corruption detection and quota errors."""

from __future__ import annotations

import httpx
import pytest

from hpi.protocol.holo import content_hash

pytestmark = pytest.mark.browser

# Rewrites one byte of a stored entry behind the store's back, with the raw IndexedDB API
# (the schema is store.js's: object stores 'packs' by hash, 'holograms' by sessionId).
CORRUPT = """async ([storeName, key]) => {
  const db = await new Promise((res, rej) => {
    const req = indexedDB.open('hpi');
    req.onsuccess = () => res(req.result);
    req.onerror = () => rej(req.error);
  });
  const tx = db.transaction(storeName, 'readwrite');
  const objects = tx.objectStore(storeName);
  const entry = await new Promise((res) => { objects.get(key).onsuccess = (e) => res(e.target.result); });
  entry.bytes[entry.bytes.length >> 1] ^= 0x40;
  objects.put(entry);
  await new Promise((res) => { tx.oncomplete = res; });
  const info = {version: db.version, stores: [...db.objectStoreNames]};
  db.close();
  return info;
}"""
RAW_GET = """async ([storeName, key]) => {
  const db = await new Promise((res) => { indexedDB.open('hpi').onsuccess = (e) => res(e.target.result); });
  const entry = await new Promise((res) => {
    db.transaction(storeName).objectStore(storeName).get(key).onsuccess = (e) => res(e.target.result);
  });
  db.close();
  return entry === undefined ? null : entry.bytes.length;
}"""


def new_session(base: str) -> tuple[dict, dict]:
    messages = [{"role": "user", "content": "Keep this conversation in the browser."}]
    created = httpx.post(f"{base}/v1/sessions", json={"messages": messages}).raise_for_status().json()
    return created, {"Authorization": f"Bearer {created['token']}"}


def test_pack_roundtrip_and_corruption(page, tiny_server):
    _, anchor = tiny_server
    warnings = []
    page.on("console", lambda m: warnings.append(m.text) if m.type == "warning" else None)
    url, key = f"/v1/models/{anchor.model_key}/pack", anchor.pack_hash
    got = page.evaluate("""async ([url, hash]) => {
      const {openStore} = await import('/client/store.js');
      const {contentHash} = await import('/client/holo.js');
      const bytes = new Uint8Array(await (await fetch(url)).arrayBuffer());
      const store = await openStore();
      await store.putPack(hash, bytes);
      const back = await store.getPack(hash);
      store.close();
      const reopened = await openStore();  // a new connection reads it too
      const again = await reopened.getPack(hash);
      return {size: back.length, hash: await contentHash(back), again: await contentHash(again),
              missing: await reopened.getPack('0'.repeat(64)), corruptions: store.corruptions + reopened.corruptions};
    }""", [url, key])
    assert got == {"size": len(anchor.pack_bytes), "hash": key, "again": key, "missing": None, "corruptions": 0}

    schema = page.evaluate(CORRUPT, ["packs", key])
    assert schema == {"version": 1, "stores": ["holograms", "packs", "sessions"]}
    got = page.evaluate("""async (hash) => {
      const {openStore} = await import('/client/store.js');
      const store = await openStore();
      return {pack: await store.getPack(hash), corruptions: store.corruptions};
    }""", key)
    assert got == {"pack": None, "corruptions": 1}
    assert page.evaluate(RAW_GET, ["packs", key]) is None  # deleted, so the next load fetches it again
    assert len(warnings) == 1 and key in warnings[0] and "corrupted" in warnings[0]


def test_pack_stored_under_another_hash_counts_as_corrupted(page):
    got = page.evaluate("""async () => {
      const {openStore} = await import('/client/store.js');
      const store = await openStore();
      await store.putPack('ab'.repeat(32), new Uint8Array([1, 2, 3]));
      return [await store.getPack('ab'.repeat(32)), store.corruptions];
    }""")
    assert got == [None, 1]


def test_hologram_and_session_survive_a_reload(page, tiny_server):
    base, _ = tiny_server
    created, headers = new_session(base)
    r = httpx.get(base + created["hologram_url"], headers=headers).raise_for_status()
    sid = created["session_id"]
    record = {"id": sid, "token": created["token"], "modelKey": "tiny", "nTokens": created["n_tokens"]}
    info = {"etag": r.headers["etag"], "start": int(r.headers["x-hpi-start"]), "end": int(r.headers["x-hpi-end"])}
    sha = page.evaluate("""async ([url, headers, record, info]) => {
      const {openStore} = await import('/client/store.js');
      const bytes = new Uint8Array(await (await fetch(url, {headers})).arrayBuffer());
      const store = await openStore();
      await store.putSession(record);
      await store.putSession({id: 'other', token: 't'});
      return store.putHologram(record.id, bytes, info);
    }""", [created["hologram_url"], headers, record, info])
    assert sha == content_hash(r.content) == info["etag"].strip('"')

    page.reload()
    got = page.evaluate("""async (id) => {
      const {openStore} = await import('/client/store.js');
      const {loadHologram} = await import('/client/holo.js');
      const store = await openStore();
      const h = await store.getHologram(id);
      const holo = await loadHologram(h.bytes);
      return {sha256: h.sha256, info: h.info, size: h.bytes.length, kind: holo.kind,
              session: await store.getSession(id), ids: (await store.listSessions()).map((s) => s.id).sort()};
    }""", sid)
    assert got == {"sha256": sha, "info": info, "size": len(r.content), "kind": "conversation",
                   "session": record, "ids": sorted([sid, "other"])}

    page.evaluate(CORRUPT, ["holograms", sid])
    got = page.evaluate("""async (id) => {
      const {openStore} = await import('/client/store.js');
      const store = await openStore();
      const corrupted = [await store.getHologram(id), store.corruptions];
      await store.deleteSession('other');
      return {corrupted, session: await store.getSession(id), other: await store.getSession('other'),
              ids: (await store.listSessions()).map((s) => s.id)};
    }""", sid)
    assert got == {"corrupted": [None, 1], "session": record, "other": None, "ids": [sid]}


def test_delete_session_removes_its_hologram(page):
    got = page.evaluate("""async () => {
      const {openStore} = await import('/client/store.js');
      const store = await openStore();
      await store.putSession({id: 's1', token: 't'});
      await store.putHologram('s1', new Uint8Array([9, 8, 7]), {start: 0, end: 3});
      const before = (await store.getHologram('s1')).info;
      await store.deleteSession('s1');
      return [before, await store.getHologram('s1'), await store.getSession('s1'), await store.listSessions()];
    }""")
    assert got == [{"start": 0, "end": 3}, None, None, []]


def test_bad_session_record_is_a_type_error(page):
    got = page.evaluate("""async () => {
      const {openStore} = await import('/client/store.js');
      try { await (await openStore()).putSession({token: 't'}); } catch (e) { return e.name; }
    }""")
    assert got == "TypeError"


def test_quota_errors(page):
    """A storage bucket with a real 1 MB quota, which the browser enforces."""
    got = page.evaluate("""async () => {
      const {openStore, StoreError} = await import('/client/store.js');
      const bucket = await navigator.storageBuckets.open('small', {quota: 1e6});
      const big = Uint8Array.from({length: 2e6}, (_, i) => i * 7919 % 251);
      const attempt = async (store, put) => {
        try { await put(store); return 'stored'; }
        catch (e) { return {isStoreError: e instanceof StoreError, code: e.code, message: e.message}; }
      };
      const store = await openStore('hpi', bucket);
      const fits = await attempt(store, (s) => s.putPack('cd'.repeat(32), new Uint8Array(1000)));
      const early = await attempt(store, (s) => s.putPack('ab'.repeat(32), big));
      const hologram = await attempt(store, (s) => s.putHologram('s1', big, {}));
      // A storage that cannot estimate (as where navigator.storage.estimate is missing)
      // lets the put reach IndexedDB, so the refusal is the browser's QuotaExceededError.
      const blind = await openStore('hpi-blind', {indexedDB: bucket.indexedDB, estimate: async () => ({})});
      const refused = await attempt(blind, (s) => s.putPack('ab'.repeat(32), big));
      return {fits, early, hologram, refused, usage: await store.usage(),
              stored: [await store.getPack('ab'.repeat(32)), await blind.getPack('ab'.repeat(32)),
                       await store.getHologram('s1')]};
    }""")
    assert got["fits"] == "stored"
    for key in ("early", "hologram", "refused"):
        assert got[key]["isStoreError"] and got[key]["code"] == "quota", got[key]
        assert "2.0 MB" in got[key]["message"], got[key]
    assert "model pack abababababab" in got["early"]["message"] and "1.0 MB quota" in got["early"]["message"]
    assert "session s1" in got["hologram"]["message"]
    assert "the browser refused" in got["refused"]["message"]
    assert got["usage"]["quota"] == 1_000_000
    assert got["stored"] == [None, None, None]
