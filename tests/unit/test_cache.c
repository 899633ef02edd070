/* Unit tests for src/gw_cache.c: key building (what is in a key and what
 * is not), lookups (hit, stale, lead, wait), the LRU order and the byte
 * bound, values that outlive their eviction while referenced, waiters
 * handed back through a port (and cancelled), stale-if-error, retired
 * scopes. Times are passed in (now_ms), never slept. */
#include "gw_cache.h"
#include "gw_test.h"

#include <event2/event.h>
#include <stdlib.h>
#include <string.h>

static const gw_cache_conf_t conf = {
    .cache = true, .coalesce = true, .ttl_ms = 1000, .swr_ms = 1000, .sie_ms = 5000, .honor_cache_control = true};

/* A value of len bytes of c, fresh for ttl from now (the conf's windows after it). */
static gw_cache_val_t *
val_of(char c, size_t len, uint64_t now)
{
    char *b = malloc(len + 1);
    memset(b, c, len);
    gw_cache_val_t *v = gw_cache_val_new(200, b, len, now);
    v->fresh_ms = now + (uint64_t)conf.ttl_ms;
    v->swr_ms = v->fresh_ms + (uint64_t)conf.swr_ms;
    v->sie_ms = v->fresh_ms + (uint64_t)conf.sie_ms;
    return v;
}

/* Stores val under key k (a lookup that leads, then the flight's end). */
static void
store(gw_cache_scope_t *s, const char *k, gw_cache_val_t *val, uint64_t now)
{
    gw_cache_ask_t ask = {0};
    CHECK(gw_cache_lookup(s, k, strlen(k), now, &ask) == GW_CACHE_LEAD);
    CHECK(ask.flight != NULL && ask.waiter == NULL);
    gw_cache_flight_done(ask.flight, val, true, GW_FAIL_NONE, 200);
}

static gw_cache_result_t
look(gw_cache_scope_t *s, const char *k, uint64_t now, gw_cache_val_t **val)
{
    gw_cache_ask_t ask = {0};
    gw_cache_result_t r = gw_cache_lookup(s, k, strlen(k), now, &ask);
    if (ask.flight) /* nobody fetches here: the flight ends at once, failed */
        gw_cache_flight_done(ask.flight, NULL, false, GW_FAIL_TIMEOUT, 0);
    if (val)
        *val = ask.val;
    else
        gw_cache_val_unref(ask.val);
    return r;
}

static void
test_key(void)
{
    gw_tpl_buf_t a = {0}, b = {0};
    const char *h1 =
        "GET /u/1?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9\r\nAuthorization: alice\r\nAccept: application/json\r\n"
        "X-Request-Id: r1\r\nX-Forwarded-For: 10.0.0.1\r\nX-Forwarded-Host: a.example\r\nVia: 1.1 gatherd\r\n"
        "\r\n";
    gw_cache_key(&a, h1, strlen(h1), NULL, 0);
    CHECK_STR(a.data, "GET /u/1?x=1\nAuthorization: alice\nAccept: application/json\nX-Forwarded-Host: a.example\n"
                      "Via: 1.1 gatherd\n\n");
    /* another request id, client address and backend host: the same key */
    const char *h2 =
        "GET /u/1?x=1 HTTP/1.1\r\nHost: other:1\r\nAuthorization: alice\r\nAccept: application/json\r\n"
        "X-Request-Id: r2\r\nX-Forwarded-For: 10.9.9.9\r\nX-Forwarded-Host: a.example\r\nVia: 1.1 gatherd\r\n"
        "\r\n";
    gw_cache_key(&b, h2, strlen(h2), NULL, 0);
    CHECK(a.len == b.len && memcmp(a.data, b.data, a.len) == 0);
    /* another token, query, forwarded host, or body: another key */
    const char *h3[] = {
        "GET /u/1?x=1 HTTP/1.1\r\nAuthorization: bob\r\nAccept: application/json\r\nX-Forwarded-Host: a.example\r\n"
        "Via: 1.1 gatherd\r\n\r\n",
        "GET /u/1?x=2 HTTP/1.1\r\nAuthorization: alice\r\nAccept: application/json\r\nX-Forwarded-Host: a.example\r\n"
        "Via: 1.1 gatherd\r\n\r\n",
        "GET /u/1?x=1 HTTP/1.1\r\nAuthorization: alice\r\nAccept: application/json\r\nX-Forwarded-Host: b.example\r\n"
        "Via: 1.1 gatherd\r\n\r\n",
    };
    for (size_t i = 0; i < 3; i++) {
        gw_cache_key(&b, h3[i], strlen(h3[i]), NULL, 0);
        CHECK(!(a.len == b.len && memcmp(a.data, b.data, a.len) == 0));
    }
    gw_cache_key(&b, h1, strlen(h1), "{\"a\":1}", 7);
    CHECK(b.len == a.len + 7 && memcmp(b.data + a.len, "{\"a\":1}", 7) == 0);
    /* a header value cannot pass for a line of its own: lines are kept whole, in order */
    const char *h4 = "GET /u HTTP/1.1\r\nX-A: 1\r\nX-B: 2\r\n\r\n", *h5 = "GET /u HTTP/1.1\r\nX-B: 2\r\nX-A: 1\r\n\r\n";
    gw_cache_key(&a, h4, strlen(h4), NULL, 0);
    gw_cache_key(&b, h5, strlen(h5), NULL, 0);
    CHECK(!(a.len == b.len && memcmp(a.data, b.data, a.len) == 0));
    gw_tpl_buf_free(&a);
    gw_tpl_buf_free(&b);
}

static void
test_hit_stale_and_windows(void)
{
    gw_cache_set_max_bytes(1 << 20);
    gw_cache_scope_t *s = gw_cache_scope_new(&conf, "/r", "c", "b", "k");
    uint64_t t = 1000000;
    CHECK(look(s, "k1", t, NULL) == GW_CACHE_LEAD);
    store(s, "k1", val_of('a', 10, t), t);
    gw_cache_val_t *v = NULL;
    CHECK(look(s, "k1", t + 999, &v) == GW_CACHE_HIT);
    CHECK(v && v->len == 10 && v->body[0] == 'a');
    gw_cache_val_unref(v);
    /* past the ttl, within stale_while_revalidate: stale, and one refresh */
    gw_cache_ask_t ask = {0};
    CHECK(gw_cache_lookup(s, "k1", 2, t + 1000, &ask) == GW_CACHE_STALE);
    CHECK(ask.val != NULL && ask.flight != NULL);
    gw_cache_val_unref(ask.val);
    gw_cache_ask_t ask2 = {0};
    CHECK(gw_cache_lookup(s, "k1", 2, t + 1001, &ask2) == GW_CACHE_STALE);
    CHECK(ask2.val != NULL && ask2.flight == NULL); /* the refresh runs already */
    gw_cache_val_unref(ask2.val);
    gw_cache_flight_done(ask.flight, val_of('b', 10, t + 1100), true, GW_FAIL_NONE, 200);
    CHECK(look(s, "k1", t + 1200, &v) == GW_CACHE_HIT);
    CHECK(v && v->body[0] == 'b');
    gw_cache_val_unref(v);
    /* past both windows but within stale_if_error: a lookup leads (nothing is served at once) */
    CHECK(look(s, "k1", t + 1100 + 2500, NULL) == GW_CACHE_LEAD);
    gw_cache_stats_t st;
    gw_cache_scope_stats(s, &st);
    CHECK(st.hits == 2 && st.stale == 2 && st.refreshes == 1 && st.entries == 1);
    /* the last lookup's flight failed: the entry is kept for stale-if-error until its window ends */
    CHECK(look(s, "k1", t + 1100 + 6001, NULL) == GW_CACHE_LEAD);
    gw_cache_scope_stats(s, &st);
    CHECK(st.entries == 0 && st.bytes == 0);
    gw_cache_scope_unref(s);
}

static void
test_lru_and_byte_bound(void)
{
    size_t max = 8192;
    gw_cache_set_max_bytes(max);
    gw_cache_scope_t *s = gw_cache_scope_new(&conf, "/r", "c", "b", NULL);
    uint64_t t = 5000000;
    gw_cache_stats_t st;
    char k[16];
    /* entries of ~600 bytes: about 12 fit */
    for (int i = 0; i < 40; i++) {
        snprintf(k, sizeof(k), "key%d", i);
        store(s, k, val_of('x', 400, t), t);
        gw_cache_stats(&st);
        CHECK(st.bytes <= max);
        /* key0 is used after every store: it stays the most recently used */
        CHECK(look(s, "key0", t, NULL) == GW_CACHE_HIT);
    }
    gw_cache_scope_stats(s, &st);
    CHECK(st.entries >= 8 && st.entries < 40);
    CHECK(st.evictions == 40 - st.entries);
    CHECK(look(s, "key39", t, NULL) == GW_CACHE_HIT); /* the newest */
    CHECK(look(s, "key1", t, NULL) == GW_CACHE_LEAD); /* the oldest not used since */
    /* an answer over max_bytes / 8 is not stored (the waiters still get it) */
    store(s, "big", val_of('y', max / 8 + 1, t), t);
    CHECK(look(s, "big", t, NULL) == GW_CACHE_LEAD);
    /* a lower max_bytes evicts at once */
    gw_cache_set_max_bytes(2000);
    gw_cache_stats(&st);
    CHECK(st.bytes <= 2000 && st.entries >= 1);
    gw_cache_scope_unref(s);
    gw_cache_stats(&st);
    CHECK(st.entries == 0 && st.bytes == 0);
}

static void
test_refcount_outlives_eviction(void)
{
    gw_cache_set_max_bytes(8192);
    gw_cache_scope_t *s = gw_cache_scope_new(&conf, "/r", "c", "b", NULL);
    uint64_t t = 9000000;
    store(s, "a", val_of('a', 300, t), t);
    gw_cache_val_t *held = NULL;
    CHECK(look(s, "a", t, &held) == GW_CACHE_HIT);
    CHECK(held && __atomic_load_n(&held->refcnt, __ATOMIC_RELAXED) == 2);
    if (held == NULL) {
        gw_cache_scope_unref(s);
        return;
    }
    char k[16];
    for (int i = 0; i < 20; i++) { /* pushes "a" out */
        snprintf(k, sizeof(k), "k%d", i);
        store(s, k, val_of('z', 300, t), t);
    }
    CHECK(look(s, "a", t, NULL) == GW_CACHE_LEAD);
    /* the reader's reference is the last one: the bytes are still there (ASan says so) */
    CHECK(__atomic_load_n(&held->refcnt, __ATOMIC_RELAXED) == 1);
    CHECK(held->len == 300 && held->body[0] == 'a' && held->body[299] == 'a');
    gw_cache_val_unref(held);
    gw_cache_scope_unref(s);
}

/* --- waiters handed back through a port -------------------------------------- */

typedef struct {
    int done;
    bool stale;
    gw_fail_t code;
    char first;
} seen_t;

static void
waiter_done(gw_tjob_t *j)
{
    gw_cache_waiter_t *w = (gw_cache_waiter_t *)j;
    seen_t *seen = w->arg;
    if (seen) {
        seen->done++;
        seen->stale = w->stale;
        seen->code = w->code;
        seen->first = w->val ? w->val->body[0] : 0;
    }
    gw_cache_waiter_free(w);
}

static void
test_waiters(void)
{
    gw_cache_set_max_bytes(1 << 20);
    struct event_base *base = event_base_new();
    gw_tport_t *port = gw_tport_new(base);
    gw_cache_scope_t *s = gw_cache_scope_new(&conf, "/r", "c", "b", NULL);
    uint64_t t = gw_now_ms(); /* the flight's end reads the clock for stale-if-error */
    seen_t seen[4];
    memset(seen, 0, sizeof(seen));
    gw_cache_ask_t ask[4];
    for (int i = 0; i < 4; i++)
        ask[i] = (gw_cache_ask_t){.port = port, .done = waiter_done, .arg = &seen[i]};
    CHECK(gw_cache_lookup(s, "w", 1, t, &ask[0]) == GW_CACHE_LEAD);
    CHECK(gw_cache_lookup(s, "w", 1, t, &ask[1]) == GW_CACHE_WAIT);
    CHECK(gw_cache_lookup(s, "w", 1, t, &ask[2]) == GW_CACHE_WAIT);
    CHECK(ask[0].waiter && ask[1].waiter && ask[2].waiter && ask[1].flight == NULL);
    CHECK(gw_tport_pending(port) == 3);
    gw_cache_waiter_cancel(ask[2].waiter); /* its request left: unlinked and freed */
    CHECK(gw_tport_pending(port) == 2);
    gw_cache_flight_done(ask[0].flight, val_of('v', 20, t), true, GW_FAIL_NONE, 200);
    CHECK(seen[0].done == 0); /* never called from inside the flight's end */
    while (gw_tport_pending(port) > 0)
        event_base_loop(base, EVLOOP_ONCE);
    CHECK(seen[0].done == 1 && seen[1].done == 1 && seen[2].done == 0);
    CHECK(seen[0].first == 'v' && seen[1].first == 'v' && !seen[1].stale);
    gw_cache_stats_t st;
    gw_cache_scope_stats(s, &st);
    CHECK(st.misses == 1 && st.coalesced == 2 && st.entries == 1);

    /* stale-if-error: past every window but stale_if_error's, the flight fails */
    uint64_t later = t + 2500;
    memset(seen, 0, sizeof(seen));
    CHECK(gw_cache_lookup(s, "w", 1, later, &ask[0]) == GW_CACHE_LEAD);
    CHECK(gw_cache_lookup(s, "w", 1, later, &ask[1]) == GW_CACHE_WAIT);
    /* a waiter cancelled after the flight ended: its done frees it unused */
    gw_cache_flight_done(ask[0].flight, NULL, false, GW_FAIL_CIRCUIT_OPEN, 0);
    gw_cache_waiter_cancel(ask[1].waiter);
    while (gw_tport_pending(port) > 0)
        event_base_loop(base, EVLOOP_ONCE);
    CHECK(seen[0].done == 1 && seen[0].stale && seen[0].code == GW_FAIL_CIRCUIT_OPEN && seen[0].first == 'v');
    CHECK(seen[1].done == 0);
    gw_cache_scope_stats(s, &st);
    CHECK(st.stale_error == 2); /* counted when handed out */

    /* a retired scope drops its entries and stores nothing more */
    gw_cache_scope_retire(s);
    gw_cache_scope_stats(s, &st);
    CHECK(st.entries == 0);
    store(s, "w2", val_of('q', 5, t), t);
    CHECK(look(s, "w2", t, NULL) == GW_CACHE_LEAD);
    gw_cache_scope_unref(s);
    gw_tport_free(port);
    event_base_free(base);
}

static void
test_scope_parse(void)
{
    const char *where;
    char err[256];
    json_t *c = json_pack("{s:i, s:i}", "ttl_ms", 100, "stale_if_error_ms", 50);
    gw_cache_scope_t *s =
        gw_cache_scope_parse(c, NULL, "/r", "c", "b", "k", 1 /* GET */, false, &where, err, sizeof(err));
    CHECK(s != NULL);
    if (s) {
        const gw_cache_conf_t *cf = gw_cache_scope_conf(s);
        CHECK(cf->cache && cf->coalesce && cf->ttl_ms == 100 && cf->sie_ms == 50 && cf->swr_ms == 0 &&
              cf->honor_cache_control);
        gw_cache_scope_t *s2 = gw_cache_scope_parse(c, NULL, "/r", "c", "b", "k", 1, false, &where, err, sizeof(err));
        CHECK(gw_cache_scope_same(s, s2));
        gw_cache_scope_t *s3 =
            gw_cache_scope_parse(c, NULL, "/r", "c", "b", "other", 1, false, &where, err, sizeof(err));
        CHECK(!gw_cache_scope_same(s, s3)); /* another backend URL */
        gw_cache_scope_unref(s2);
        gw_cache_scope_unref(s3);
    }
    gw_cache_scope_unref(s);
    json_object_set_new(c, "ttl_ms", json_integer(0));
    err[0] = '\0';
    CHECK(gw_cache_scope_parse(c, NULL, "/r", "c", "b", NULL, 1, false, &where, err, sizeof(err)) == NULL);
    CHECK_STR(where, "ttl_ms");
    CHECK_CONTAINS(err, "between 1");
    json_decref(c);
    /* coalesce alone; POST refused */
    s = gw_cache_scope_parse(NULL, json_true(), "/r", "c", "b", NULL, 1, false, &where, err, sizeof(err));
    CHECK(s && !gw_cache_scope_conf(s)->cache && gw_cache_scope_conf(s)->coalesce);
    gw_cache_scope_unref(s);
    err[0] = '\0';
    CHECK(gw_cache_scope_parse(NULL, json_true(), "/r", "c", "b", NULL, 3 /* POST */, false, &where, err,
                               sizeof(err)) == NULL);
    CHECK_CONTAINS(err, "needs method GET");
}

static void
test_shutdown(void)
{
    gw_cache_shutdown();
}

TEST_MAIN({"key", test_key}, {"hit_stale_and_windows", test_hit_stale_and_windows},
          {"lru_and_byte_bound", test_lru_and_byte_bound},
          {"refcount_outlives_eviction", test_refcount_outlives_eviction}, {"waiters", test_waiters},
          {"scope_parse", test_scope_parse}, {"shutdown", test_shutdown})
