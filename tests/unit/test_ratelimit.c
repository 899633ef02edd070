/* Unit tests for src/gw_ratelimit.c (token buckets on a simulated clock,
 * shared by threads, bounded keyed tables), src/gw_realip.c (address
 * parsing and blocks) and src/gw_inflight.c. */
#include "gw_config.h"
#include "gw_inflight.h"
#include "gw_ratelimit.h"
#include "gw_realip.h"
#include "gw_test.h"

#include <arpa/inet.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MS 1000000ULL

static gw_ratelimit_t *
limiter(unsigned rate, int period_ms, unsigned burst, gw_rl_key_t key, unsigned max_keys)
{
    gw_ratelimit_conf_t c = { .rate = rate, .period_ms = period_ms, .burst = burst, .key = key,
                              .header = key == GW_RL_KEY_HEADER ? "K" : NULL, .max_keys = max_keys };
    return gw_ratelimit_new(&c);
}

/* A request every millisecond for 10 s at 20 per second, burst 5: exactly
 * 5 + 200 admitted, and the bucket refills continuously (no per-second
 * steps). Rates that do not divide the period (3 per 1000 ms) too. */
static void
test_exact_rate(void)
{
    uint64_t t0 = gw_now_ns() + 1000 * MS;
    gw_ratelimit_t *rl = limiter(20, 1000, 5, GW_RL_KEY_GLOBAL, 0);
    unsigned admitted = 0;
    gw_ratelimit_result_t r;
    for (uint64_t t = 0; t <= 10000; t++) { /* the 200th token comes at 10 s */
        gw_ratelimit_take(rl, NULL, 0, t0 + t * MS, &r);
        admitted += r.admitted;
    }
    CHECK(admitted == 5 + 200);
    gw_ratelimit_unref(rl);

    /* burst 3: the bucket never sits full after the first burst (with burst
     * 1, a token waits for the next 7 ms step and refill beyond the
     * capacity is lost, as a token bucket should) */
    rl = limiter(3, 1000, 3, GW_RL_KEY_GLOBAL, 0);
    admitted = 0;
    for (uint64_t t = 0; t < 3000000; t += 7) { /* 3000 s in 7 ms steps; the last at 2999.997 s */
        gw_ratelimit_take(rl, NULL, 0, t0 + t * MS, &r);
        admitted += r.admitted;
    }
    if (admitted != 3 + 8999)
        printf("    3 per second over 2999.997 s: %u admitted\n", admitted);
    CHECK(admitted == 3 + 8999);
    gw_ratelimit_unref(rl);
}

static void
test_result_fields(void)
{
    uint64_t t0 = gw_now_ns() + 1000 * MS;
    gw_ratelimit_t *rl = limiter(2, 10000, 2, GW_RL_KEY_GLOBAL, 0);
    gw_ratelimit_result_t r;
    gw_ratelimit_take(rl, NULL, 0, t0, &r);
    CHECK(r.admitted && r.remaining == 1 && r.reset_ms == 5000);
    gw_ratelimit_take(rl, NULL, 0, t0, &r);
    CHECK(r.admitted && r.remaining == 0 && r.reset_ms == 10000);
    gw_ratelimit_take(rl, NULL, 0, t0 + 1000 * MS, &r);
    CHECK(!r.admitted && r.remaining == 0 && r.reset_ms == 4000); /* one token at t0 + 5 s */
    gw_ratelimit_take(rl, NULL, 0, t0 + 5000 * MS, &r);
    CHECK(r.admitted && r.remaining == 0);
    gw_ratelimit_take(rl, NULL, 0, t0 + 60000 * MS, &r); /* idle: full again, not more */
    CHECK(r.admitted && r.remaining == 1);
    gw_ratelimit_unref(rl);
}

typedef struct {
    gw_ratelimit_t *rl;
    uint64_t t;
    unsigned admitted;
    int keyed;
} worker_arg_t;

static void *
hammer(void *p)
{
    worker_arg_t *a = p;
    gw_ratelimit_result_t r;
    char key[16];
    for (int i = 0; i < 20000; i++) {
        int n = snprintf(key, sizeof(key), "k%d", i % 10);
        gw_ratelimit_take(a->rl, key, (size_t)n, a->t, &r);
        a->admitted += r.admitted;
    }
    return NULL;
}

/* Eight threads at one instant: exactly burst admitted in all (one bucket
 * for the process, not one per thread); keyed: burst per key. */
static void
test_threads_share_one_bucket(void)
{
    uint64_t t = gw_now_ns() + 1000 * MS;
    for (int keyed = 0; keyed < 2; keyed++) {
        gw_ratelimit_t *rl = limiter(1000, 1000, 100, keyed ? GW_RL_KEY_CLIENT : GW_RL_KEY_GLOBAL, 1000);
        pthread_t th[8];
        worker_arg_t args[8];
        for (int i = 0; i < 8; i++) {
            args[i] = (worker_arg_t){ .rl = rl, .t = t, .keyed = keyed };
            pthread_create(&th[i], NULL, hammer, &args[i]);
        }
        unsigned total = 0;
        for (int i = 0; i < 8; i++) {
            pthread_join(th[i], NULL);
            total += args[i].admitted;
        }
        CHECK(total == (keyed ? 100u * 10 : 100u));
        if (keyed)
            CHECK(gw_ratelimit_nkeys(rl) == 10);
        gw_ratelimit_unref(rl);
    }
}

/* max_keys: the table never holds more; full buckets are replaced, an
 * active one is not (overflow bucket instead). Large tables are sharded. */
static void
test_max_keys(void)
{
    uint64_t t0 = gw_now_ns() + 1000 * MS;
    gw_ratelimit_t *rl = limiter(1, 1000, 1, GW_RL_KEY_HEADER, 2);
    gw_ratelimit_result_t r;
    gw_ratelimit_take(rl, "a", 1, t0, &r);
    CHECK(r.admitted);
    gw_ratelimit_take(rl, "b", 1, t0, &r);
    CHECK(r.admitted);
    gw_ratelimit_take(rl, "c", 1, t0, &r); /* overflow, full */
    CHECK(r.admitted && gw_ratelimit_nkeys(rl) == 2);
    gw_ratelimit_take(rl, "d", 1, t0, &r); /* overflow, empty */
    CHECK(!r.admitted);
    gw_ratelimit_take(rl, "c", 1, t0 + 2000 * MS, &r); /* a and b are full again: c replaces one */
    CHECK(r.admitted && gw_ratelimit_nkeys(rl) == 2);
    gw_ratelimit_take(rl, "c", 1, t0 + 2000 * MS, &r);
    CHECK(!r.admitted); /* its own bucket now */
    gw_ratelimit_unref(rl);

    rl = limiter(1, 1000, 1, GW_RL_KEY_CLIENT, 100000);
    char key[32];
    for (int i = 0; i < 250000; i++) {
        int n = snprintf(key, sizeof(key), "10.%d.%d.%d", i >> 16, (i >> 8) & 255, i & 255);
        gw_ratelimit_take(rl, key, (size_t)n, t0 + (uint64_t)i * 10000, &r);
    }
    size_t n = gw_ratelimit_nkeys(rl);
    CHECK(n <= 100000 && n > 90000);
    gw_ratelimit_unref(rl);
}

static void
test_realip_parse(void)
{
    int fam;
    unsigned char a[16];
    CHECK(gw_realip_parse_addr("1.2.3.4", 7, &fam, a) && fam == AF_INET && a[0] == 1 && a[3] == 4);
    CHECK(gw_realip_parse_addr("1.2.3.4:80", 10, &fam, a) && fam == AF_INET);
    CHECK(gw_realip_parse_addr("::1", 3, &fam, a) && fam == AF_INET6 && a[15] == 1);
    CHECK(gw_realip_parse_addr("[::1]", 5, &fam, a) && fam == AF_INET6);
    CHECK(gw_realip_parse_addr("[::1]:443", 9, &fam, a) && fam == AF_INET6);
    CHECK(gw_realip_parse_addr("::ffff:10.1.2.3", 15, &fam, a) && fam == AF_INET && a[0] == 10 && a[3] == 3);
    const char *bad[] = { "", "1.2.3", "1.2.3.4.5", "1.2.3.4:", "1.2.3.4:x", "[1.2.3.4]", "[::1", "[::1]x",
                          "unknown", "1.2.3.4 ", "::1:99999:1", "1.2.3.4:123456" };
    for (size_t i = 0; i < GW_NELEM(bad); i++)
        CHECK(!gw_realip_parse_addr(bad[i], strlen(bad[i]), &fam, a));

    char err[256];
    gw_cidr_t blocks[3];
    CHECK(gw_realip_parse_cidr("10.0.0.0/8", &blocks[0], err, sizeof(err)) == GW_OK);
    CHECK(gw_realip_parse_cidr("2001:db8::/33", &blocks[1], err, sizeof(err)) == GW_OK);
    CHECK(gw_realip_parse_cidr("192.0.2.1", &blocks[2], err, sizeof(err)) == GW_OK);
    CHECK(gw_realip_parse_cidr("2001:db8:4000::/33", &blocks[0], err, sizeof(err)) == GW_ERR);
    CHECK_CONTAINS(err, "bits set beyond the /33 prefix");
    gw_config_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.trusted_proxies = blocks;
    cfg.ntrusted = 3;
    gw_realip_parse_cidr("10.0.0.0/8", &blocks[0], err, sizeof(err));
    static const struct {
        const char *ip;
        bool trusted;
    } cases[] = { { "10.255.1.2", true },      { "11.0.0.1", false },         { "::ffff:10.9.9.9", true },
                  { "2001:db8:7fff::1", true }, { "2001:db8:8000::1", false }, { "192.0.2.1", true },
                  { "192.0.2.2", false },       { "::a00:1", false } };
    for (size_t i = 0; i < GW_NELEM(cases); i++) {
        CHECK(gw_realip_parse_addr(cases[i].ip, strlen(cases[i].ip), &fam, a));
        if (gw_realip_trusted(&cfg, fam, a) != cases[i].trusted)
            printf("    %s: trusted should be %d\n", cases[i].ip, cases[i].trusted);
        CHECK(gw_realip_trusted(&cfg, fam, a) == cases[i].trusted);
    }
}

static void
test_inflight(void)
{
    unsigned base = gw_inflight_current();
    CHECK(gw_inflight_acquire(base + 2));
    CHECK(gw_inflight_acquire(base + 2));
    CHECK(!gw_inflight_acquire(base + 2));
    gw_inflight_release();
    CHECK(gw_inflight_acquire(base + 2));
    gw_inflight_release();
    gw_inflight_release();
    CHECK(gw_inflight_current() == base);
}

TEST_MAIN(T(test_exact_rate), T(test_result_fields), T(test_threads_share_one_bucket), T(test_max_keys),
          T(test_realip_parse), T(test_inflight))
