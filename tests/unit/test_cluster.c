/* Unit tests for src/gw_cluster.c: smooth weighted round robin against
 * nginx's algorithm, per-worker state, the tried mask, backups,
 * least_request, the consistent-hash ring (keys moved by removing or
 * adding a server), outlier ejection (doubling, the max_ejected_percent
 * cap, return, reset by a success), health by active checks, and a reload
 * keeping a server's state. Backends come from real configurations. */
#include "gw_cluster.h"
#include "gw_config.h"
#include "gw_fail.h"
#include "gw_test.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char err[2048];

/* A configuration with one backend "b" whose body (servers, balance...) is
 * given, and 2 workers. */
static gw_config_t *
conf(const char *backend_body)
{
    char text[8192];
    snprintf(text, sizeof(text), "{\"listen\": [\"1\"], \"workers\": 2, \"backends\": {\"b\": {%s}}}", backend_body);
    err[0] = '\0';
    gw_config_t *cfg = gw_config_parse(text, "t.json", ".", 0, err, sizeof(err));
    if (cfg == NULL)
        printf("    config: %s\n", err);
    return cfg;
}

/* "servers": [...] of n servers 10.0.0.1.., with weights w (NULL: 1) and
 * backups (a bit mask). */
static gw_config_t *
conf_n(size_t n, const unsigned *w, uint32_t backups, const char *extra)
{
    char body[6000];
    size_t len = (size_t)snprintf(body, sizeof(body), "\"servers\": [");
    for (size_t i = 0; i < n; i++)
        len += (size_t)snprintf(body + len, sizeof(body) - len, "%s{\"url\": \"http://10.0.0.%zu:80\", \"weight\": %u%s}",
                                i ? ", " : "", i + 1, w ? w[i] : 1, backups & (1u << i) ? ", \"backup\": true" : "");
    snprintf(body + len, sizeof(body) - len, "]%s%s", extra && *extra ? ", " : "", extra ? extra : "");
    return conf(body);
}

static unsigned
pick(const gw_backend_t *b, int w, uint32_t tried, uint64_t now)
{
    unsigned si = 99;
    CHECK(gw_cluster_pick_id(w, b, 0, false, tried, now, &si) == GW_OK);
    return si;
}

/* nginx's ngx_http_upstream_get_peer, the oracle. */
static unsigned
nginx_pick(int *cw, const unsigned *w, size_t n)
{
    int total = 0;
    size_t best = n;
    for (size_t i = 0; i < n; i++) {
        cw[i] += (int)w[i];
        total += (int)w[i];
        if (best == n || cw[i] > cw[best])
            best = i;
    }
    cw[best] -= total;
    return (unsigned)best;
}

static void
test_smooth_wrr(void)
{
    static const unsigned w[] = { 5, 1, 1 };
    gw_config_t *cfg = conf_n(3, w, 0, NULL);
    if (cfg == NULL)
        return;
    const gw_backend_t *b = cfg->backends[0];
    CHECK(b->balance == GW_BAL_RR);
    /* the first seven: a a b a c a a */
    static const unsigned first[] = { 0, 0, 1, 0, 2, 0, 0 };
    int cw[3] = { 0 };
    unsigned count[3] = { 0 };
    bool same = true;
    for (int i = 0; i < 10000; i++) {
        unsigned got = pick(b, 0, 0, 1);
        unsigned want = nginx_pick(cw, w, 3);
        if (i < 7)
            CHECK(got == first[i]);
        if (got != want)
            same = false;
        count[got]++;
    }
    CHECK(same);
    /* exact proportions: 10000 = 1428 rounds of 7, plus 4 picks (a a b a) */
    CHECK(count[0] == 1428 * 5 + 3 && count[1] == 1428 + 1 && count[2] == 1428);
    gw_config_unref(cfg);
}

static void
test_per_worker(void)
{
    static const unsigned w[] = { 5, 1, 1 };
    gw_config_t *cfg = conf_n(3, w, 0, NULL);
    if (cfg == NULL)
        return;
    const gw_backend_t *b = cfg->backends[0];
    /* worker 1's picks do not advance worker 0's sequence */
    CHECK(pick(b, 0, 0, 1) == 0);
    CHECK(pick(b, 0, 0, 1) == 0);
    for (int i = 0; i < 5; i++)
        pick(b, 1, 0, 1);
    CHECK(pick(b, 0, 0, 1) == 1);
    CHECK(pick(b, 0, 0, 1) == 0);
    CHECK(pick(b, 0, 0, 1) == 2);
    gw_config_unref(cfg);
}

static void
test_tried(void)
{
    gw_config_t *cfg = conf_n(3, NULL, 0, NULL);
    if (cfg == NULL)
        return;
    const gw_backend_t *b = cfg->backends[0];
    for (int i = 0; i < 50; i++) {
        unsigned a = pick(b, 0, 0, 1);
        unsigned c = pick(b, 0, 1u << a, 1);
        CHECK(c != a);
        unsigned d = pick(b, 0, (1u << a) | (1u << c), 1);
        CHECK(d != a && d != c);
        unsigned e = pick(b, 0, 7, 1); /* all tried: one anyway */
        CHECK(e < 3);
    }
    gw_config_unref(cfg);
}

/* Makes server si unhealthy by active checks (the backend has a health_check). */
static void
set_unhealthy(const gw_backend_t *b, unsigned si)
{
    for (unsigned i = 0; i < b->health_check->unhealthy; i++)
        gw_cluster_checked(b, &b->servers[si], GW_HC_STATUS, NULL);
    CHECK(!gw_cluster_usable(&b->servers[si], 1));
}

static void
set_healthy(const gw_backend_t *b, unsigned si)
{
    for (unsigned i = 0; i < b->health_check->healthy; i++)
        gw_cluster_checked(b, &b->servers[si], GW_HC_OK, NULL);
    CHECK(gw_cluster_usable(&b->servers[si], 1));
}

static void
test_backups(void)
{
    /* 0, 1 primaries; 2, 3 backups */
    gw_config_t *cfg = conf_n(4, NULL, 0xc, "\"health_check\": {\"healthy\": 1, \"unhealthy\": 1}");
    if (cfg == NULL)
        return;
    const gw_backend_t *b = cfg->backends[0];
    CHECK(b->nprimary == 2);
    for (int i = 0; i < 100; i++)
        CHECK(pick(b, 0, 0, 1) < 2);
    for (int i = 0; i < 20; i++)
        CHECK(pick(b, 0, 3, 1) < 2); /* primaries tried: still primaries */
    set_unhealthy(b, 0);
    for (int i = 0; i < 20; i++)
        CHECK(pick(b, 0, 0, 1) == 1);
    set_unhealthy(b, 1);
    unsigned seen = 0;
    for (int i = 0; i < 20; i++) {
        unsigned si = pick(b, 0, 0, 1);
        CHECK(si == 2 || si == 3);
        seen |= 1u << si;
    }
    CHECK(seen == 0xc); /* round robin among backups */
    CHECK(pick(b, 0, 1u << 2, 1) == 3);
    set_unhealthy(b, 2);
    set_unhealthy(b, 3);
    unsigned si;
    CHECK(gw_cluster_pick_id(0, b, 0, false, 0, 1, &si) == GW_AGAIN);
    set_healthy(b, 1);
    CHECK(pick(b, 0, 0, 1) == 1);
    gw_config_unref(cfg);
}

static void
test_least_request(void)
{
    gw_config_t *cfg = conf_n(3, NULL, 0, "\"balance\": \"least_request\"");
    if (cfg == NULL)
        return;
    const gw_backend_t *b = cfg->backends[0];
    CHECK(b->balance == GW_BAL_LEAST);
    /* in-flight 10, 0, 5: the draw pairs {0,1} {0,2} {1,2}: 1 wins 2/3, 2 wins 1/3, 0 never */
    for (int i = 0; i < 10; i++)
        gw_cluster_inflight(&b->servers[0], 1);
    for (int i = 0; i < 5; i++)
        gw_cluster_inflight(&b->servers[2], 1);
    unsigned count[3] = { 0 };
    for (int i = 0; i < 9000; i++)
        count[pick(b, 0, 0, 1)]++;
    CHECK(count[0] == 0);
    CHECK(count[1] > 5400 && count[1] < 6600);
    CHECK(count[2] > 2400 && count[2] < 3600);
    gw_config_unref(cfg);

    /* weights: in-flight 4 at weight 4 ((4+1)/4) beats in-flight 2 at weight 1 ((2+1)/1) */
    static const unsigned w[] = { 4, 1 };
    cfg = conf_n(2, w, 0, "\"balance\": \"least_request\"");
    if (cfg == NULL)
        return;
    b = cfg->backends[0];
    for (int i = 0; i < 4; i++)
        gw_cluster_inflight(&b->servers[0], 1);
    gw_cluster_inflight(&b->servers[1], 2);
    for (int i = 0; i < 100; i++)
        CHECK(pick(b, 0, 0, 1) == 0);
    gw_cluster_inflight(&b->servers[0], 10); /* 15/4 > 3/1 */
    for (int i = 0; i < 100; i++)
        CHECK(pick(b, 0, 0, 1) == 1);
    CHECK(pick(b, 0, 2, 1) == 0); /* tried */
    gw_config_unref(cfg);
}

static unsigned
hpick(const gw_backend_t *b, unsigned key)
{
    char k[32];
    int len = snprintf(k, sizeof(k), "user-%u", key);
    unsigned si = 99;
    CHECK(gw_cluster_pick_id(0, b, gw_cluster_hash(k, (size_t)len), true, 0, 1, &si) == GW_OK);
    return si;
}

#define NKEYS 10000

/* Keys of a backend of servers 10.0.0.{first..first+n-1}; url i of the
 * result is server first + i. */
static void
hash_map(size_t n, size_t skip, unsigned *out)
{
    char body[6000];
    size_t len = (size_t)snprintf(body, sizeof(body), "\"balance\": \"hash\", \"hash_key\": \"{header.X-User}\", \"servers\": [");
    bool firstp = true;
    for (size_t i = 0; i < n; i++) {
        if (i == skip)
            continue;
        len += (size_t)snprintf(body + len, sizeof(body) - len, "%s\"http://10.0.0.%zu:80\"", firstp ? "" : ", ", i + 1);
        firstp = false;
    }
    snprintf(body + len, sizeof(body) - len, "]");
    gw_config_t *cfg = conf(body);
    if (cfg == NULL)
        return;
    const gw_backend_t *b = cfg->backends[0];
    for (unsigned k = 0; k < NKEYS; k++) {
        unsigned si = hpick(b, k);
        /* back to the numbering of all n servers */
        out[k] = skip < n && si >= skip ? si + 1 : si;
    }
    gw_config_unref(cfg);
}

static void
test_hash(void)
{
    gw_config_t *cfg = conf("\"balance\": \"hash\", \"hash_key\": \"{header.X-User}\", \"servers\": "
                            "[\"http://10.0.0.1\", \"http://10.0.0.2\", \"http://10.0.0.3\", \"http://10.0.0.4\"]");
    if (cfg == NULL)
        return;
    const gw_backend_t *b = cfg->backends[0];
    CHECK(b->balance == GW_BAL_HASH && b->hash_key != NULL);
    unsigned count[4] = { 0 };
    for (unsigned k = 0; k < NKEYS; k++) {
        unsigned si = hpick(b, k);
        CHECK(hpick(b, k) == si); /* the same key, the same server */
        count[si]++;
    }
    for (int i = 0; i < 4; i++)
        CHECK(count[i] > NKEYS / 4 / 2 && count[i] < NKEYS / 4 * 2);
    /* no hash: round robin */
    unsigned seen = 0;
    for (int i = 0; i < 8; i++)
        seen |= 1u << pick(b, 0, 0, 1);
    CHECK(seen == 0xf);
    /* the key's server tried: the next one on the ring, the same for that key */
    unsigned si0 = hpick(b, 7), si1 = 99, si2 = 99;
    uint64_t h = gw_cluster_hash("user-7", 6);
    CHECK(gw_cluster_pick_id(0, b, h, true, 1u << si0, 1, &si1) == GW_OK && si1 != si0);
    CHECK(gw_cluster_pick_id(1, b, h, true, 1u << si0, 1, &si2) == GW_OK && si2 == si1);
    gw_config_unref(cfg);

    /* removing one of N servers moves about 1/N of the keys, none between two that stayed; adding likewise */
    static unsigned all[NKEYS], less[NKEYS];
    for (size_t n = 3; n <= 8; n += 5) {
        hash_map(n, n, all);
        for (size_t skip = 0; skip < n; skip += n - 1) {
            hash_map(n, skip, less);
            unsigned moved = 0, wrong = 0;
            for (unsigned k = 0; k < NKEYS; k++) {
                if (all[k] == less[k])
                    continue;
                moved++;
                if (all[k] != skip)
                    wrong++; /* a key moved between two servers that both stayed */
            }
            double share = (double)moved / NKEYS;
            if (!(share > 0.5 / (double)n && share < 1.5 / (double)n))
                printf("    n %zu, without server %zu: %.3f of the keys moved\n", n, skip, share);
            CHECK(share > 0.5 / (double)n && share < 1.5 / (double)n);
            CHECK(wrong == 0);
        }
    }
}

static void
test_hash_weights_and_backups(void)
{
    gw_config_t *cfg = conf("\"balance\": \"hash\", \"hash_key\": \"{id}\", \"health_check\": {\"unhealthy\": 1}, "
                            "\"servers\": [{\"url\": \"http://10.0.0.1\", \"weight\": 3}, \"http://10.0.0.2\", "
                            "{\"url\": \"http://10.0.0.3\", \"backup\": true}]");
    if (cfg == NULL)
        return;
    const gw_backend_t *b = cfg->backends[0];
    unsigned count[3] = { 0 };
    for (unsigned k = 0; k < NKEYS; k++)
        count[hpick(b, k)]++;
    CHECK(count[2] == 0);
    CHECK(count[0] > NKEYS * 6 / 10 && count[0] < NKEYS * 9 / 10);
    set_unhealthy(b, 0);
    set_unhealthy(b, 1);
    for (unsigned k = 0; k < 100; k++)
        CHECK(hpick(b, k) == 2);
    gw_config_unref(cfg);
}

static void
test_outlier(void)
{
    gw_config_t *cfg = conf_n(3, NULL, 0, "\"outlier_detection\": {\"consecutive_failures\": 3, \"eject_ms\": 1000, "
                                          "\"max_eject_ms\": 3000}");
    if (cfg == NULL)
        return;
    const gw_backend_t *b = cfg->backends[0];
    const gw_peer_t *s0 = &b->servers[0], *s1 = &b->servers[1];
    uint64_t t = 100000;
    /* two failures, a success, two failures: not ejected */
    gw_cluster_report(b, s0, GW_FAIL_CONNECT_FAILED, 0, t);
    gw_cluster_report(b, s0, GW_FAIL_TIMEOUT, 0, t);
    gw_cluster_report(b, s0, GW_FAIL_NONE, 200, t);
    gw_cluster_report(b, s0, GW_FAIL_BAD_STATUS, 503, t);
    gw_cluster_report(b, s0, GW_FAIL_RESET, 0, t);
    CHECK(gw_cluster_usable(s0, t));
    /* a 404 and local failures are not failures of the server */
    gw_cluster_report(b, s0, GW_FAIL_BAD_STATUS, 404, t);
    gw_cluster_report(b, s0, GW_FAIL_TIMEOUT, 0, t);
    gw_cluster_report(b, s0, GW_FAIL_QUEUE_FULL, 0, t);
    gw_cluster_report(b, s0, GW_FAIL_TIMEOUT, 0, t);
    CHECK(gw_cluster_usable(s0, t));
    gw_cluster_report(b, s0, GW_FAIL_TIMEOUT, 0, t);
    CHECK(!gw_cluster_usable(s0, t)); /* 3 in a row: ejected for 1000 ms */
    CHECK(!gw_cluster_usable(s0, t + 999));
    CHECK(gw_cluster_usable(s0, t + 1000));
    for (int i = 0; i < 20; i++)
        CHECK(pick(b, 0, 0, t + 500) != 0);
    gw_hserver_stats_t st;
    gw_cluster_stats(s0, t + 500, &st);
    CHECK(st.ejected && st.ejected_for_ms == 500 && st.ejections == 1 && st.ejections_in_row == 1);
    CHECK(st.requests == 10 && st.failures[GW_FAIL_TIMEOUT] == 4 && st.failures[GW_FAIL_NONE] == 1);
    /* the cap: 3 servers at 50%: one ejected at a time */
    for (int i = 0; i < 3; i++)
        gw_cluster_report(b, s1, GW_FAIL_CONNECT_FAILED, 0, t + 10);
    CHECK(gw_cluster_usable(s1, t + 10));
    /* back, then ejected again: 2000 ms, then 3000 (the cap) */
    t += 1000;
    for (int i = 0; i < 3; i++)
        gw_cluster_report(b, s0, GW_FAIL_CONNECT_FAILED, 0, t);
    CHECK(!gw_cluster_usable(s0, t + 1999) && gw_cluster_usable(s0, t + 2000));
    t += 2000;
    for (int i = 0; i < 3; i++)
        gw_cluster_report(b, s0, GW_FAIL_CONNECT_FAILED, 0, t);
    CHECK(!gw_cluster_usable(s0, t + 2999) && gw_cluster_usable(s0, t + 3000));
    t += 3000;
    /* while s0 is back, s1 may be ejected (one at a time) */
    for (int i = 0; i < 3; i++)
        gw_cluster_report(b, s1, GW_FAIL_CONNECT_FAILED, 0, t);
    CHECK(!gw_cluster_usable(s1, t));
    for (int i = 0; i < 3; i++)
        gw_cluster_report(b, s0, GW_FAIL_CONNECT_FAILED, 0, t);
    CHECK(gw_cluster_usable(s0, t)); /* refused by the cap */
    /* back for longer than max_eject_ms: the doubling starts over */
    t += 10000;
    for (int i = 0; i < 3; i++)
        gw_cluster_report(b, s0, GW_FAIL_CONNECT_FAILED, 0, t);
    CHECK(!gw_cluster_usable(s0, t + 999) && gw_cluster_usable(s0, t + 1000));
    gw_config_unref(cfg);

    /* one server at 50%: never ejected; without outlier_detection: never */
    cfg = conf_n(1, NULL, 0, "\"outlier_detection\": {\"consecutive_failures\": 1}");
    if (cfg == NULL)
        return;
    gw_cluster_report(cfg->backends[0], &cfg->backends[0]->servers[0], GW_FAIL_RESET, 0, 5);
    CHECK(gw_cluster_usable(&cfg->backends[0]->servers[0], 5));
    gw_config_unref(cfg);
    cfg = conf_n(2, NULL, 0, NULL);
    if (cfg == NULL)
        return;
    for (int i = 0; i < 100; i++)
        gw_cluster_report(cfg->backends[0], &cfg->backends[0]->servers[0], GW_FAIL_RESET, 0, 5);
    CHECK(gw_cluster_usable(&cfg->backends[0]->servers[0], 5));
    gw_config_unref(cfg);
}

static void
test_usable(void)
{
    gw_config_t *cfg = conf_n(2, NULL, 0, "\"health_check\": {\"healthy\": 2, \"unhealthy\": 3}, "
                                          "\"outlier_detection\": {\"consecutive_failures\": 1, \"eject_ms\": 100}");
    if (cfg == NULL)
        return;
    const gw_backend_t *b = cfg->backends[0];
    const gw_peer_t *s = &b->servers[0];
    unsigned row = 0;
    CHECK(gw_cluster_usable(s, 10)); /* a new server starts healthy */
    CHECK(gw_cluster_checked(b, s, GW_HC_TIMEOUT, &row) == 0 && row == 1);
    CHECK(gw_cluster_checked(b, s, GW_HC_STATUS, &row) == 0 && row == 2);
    CHECK(gw_cluster_usable(s, 10));
    CHECK(gw_cluster_checked(b, s, GW_HC_CONNECT, &row) == -1 && row == 3);
    CHECK(!gw_cluster_usable(s, 10));
    CHECK(gw_cluster_checked(b, s, GW_HC_CONNECT, &row) == 0 && row == 4);
    CHECK(gw_cluster_checked(b, s, GW_HC_OK, &row) == 0 && row == 1);
    CHECK(gw_cluster_checked(b, s, GW_HC_STATUS, &row) == 0 && row == 1);
    CHECK(gw_cluster_checked(b, s, GW_HC_OK, &row) == 0 && row == 1);
    CHECK(!gw_cluster_usable(s, 10));
    CHECK(gw_cluster_checked(b, s, GW_HC_OK, &row) == 1 && row == 2);
    CHECK(gw_cluster_usable(s, 10));
    /* healthy but ejected; ejected time over but unhealthy */
    gw_cluster_report(b, s, GW_FAIL_RESET, 0, 10);
    CHECK(!gw_cluster_usable(s, 10) && gw_cluster_usable(s, 110));
    for (int i = 0; i < 3; i++)
        gw_cluster_checked(b, s, GW_HC_STATUS, NULL);
    CHECK(!gw_cluster_usable(s, 110));
    gw_hserver_stats_t st;
    gw_cluster_stats(s, 110, &st);
    CHECK(!st.healthy && st.checks[GW_HC_OK] == 3 && st.checks[GW_HC_STATUS] == 5 && st.checks[GW_HC_CONNECT] == 2);
    gw_config_unref(cfg);
}

/* A reload keeps the state of servers whose URL and health settings did not change. */
static void
test_inherit(void)
{
    const char *hc = "\"health_check\": {\"unhealthy\": 1}";
    gw_config_t *a = conf_n(3, NULL, 0, hc);
    gw_config_t *b = conf("\"health_check\": {\"unhealthy\": 1}, \"servers\": [\"http://10.0.0.3:80\", "
                          "\"http://10.0.0.1:80\", \"http://10.0.0.9:80\"]");
    gw_config_t *c = conf("\"health_check\": {\"unhealthy\": 2}, \"servers\": [\"http://10.0.0.1:80\"]");
    if (a == NULL || b == NULL || c == NULL)
        return;
    set_unhealthy(a->backends[0], 0);
    gw_cluster_inherit(b, a);
    gw_cluster_inherit(c, a);
    CHECK(b->backends[0]->servers[1].hs == a->backends[0]->servers[0].hs);
    CHECK(b->backends[0]->servers[0].hs == a->backends[0]->servers[2].hs);
    CHECK(!gw_cluster_usable(&b->backends[0]->servers[1], 1));
    CHECK(gw_cluster_usable(&b->backends[0]->servers[2], 1)); /* new: healthy */
    CHECK(gw_cluster_usable(&c->backends[0]->servers[0], 1)); /* other settings: fresh */
    gw_config_unref(a); /* b keeps its reference */
    CHECK(!gw_cluster_usable(&b->backends[0]->servers[1], 1));
    gw_config_unref(b);
    gw_config_unref(c);
}

static void
test_hash_function(void)
{
    /* FNV-1a of "" is its offset basis; fmix64 of it */
    CHECK(gw_cluster_hash("", 0) != 0);
    CHECK(gw_cluster_hash("a", 1) != gw_cluster_hash("b", 1));
    CHECK(gw_cluster_hash("abc", 3) == gw_cluster_hash("abc", 3));
    /* avalanche: one input bit flips about half of the output bits */
    unsigned total = 0;
    for (unsigned i = 0; i < 256; i++) {
        char x[8] = { 0 }, y[8] = { 0 };
        memcpy(x, &i, sizeof(i));
        memcpy(y, &i, sizeof(i));
        y[0] ^= 1;
        total += (unsigned)__builtin_popcountll(gw_cluster_hash(x, 8) ^ gw_cluster_hash(y, 8));
    }
    CHECK(total / 256 > 24 && total / 256 < 40);
}

TEST_MAIN({ "smooth weighted round robin = nginx", test_smooth_wrr }, { "per-worker state", test_per_worker },
          { "tried mask", test_tried }, { "backups", test_backups }, { "least_request", test_least_request },
          { "hash ring", test_hash }, { "hash: weights, backups", test_hash_weights_and_backups },
          { "outlier detection", test_outlier }, { "usable: checks and ejection", test_usable },
          { "reload keeps server state", test_inherit }, { "hash function", test_hash_function })
