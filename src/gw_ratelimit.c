/*
 * gw_ratelimit.c - token buckets shared by all workers (see gw_ratelimit.h
 * and README "Rate limits").
 *
 * Each bucket is a GCRA ("generic cell rate algorithm") state: one 64-bit
 * word, the theoretical arrival time (TAT) of the next request, which is
 * exactly a token bucket of capacity burst refilled continuously at
 * rate/period: a request at time now is admitted when
 * max(TAT, now) + T - now <= burst * T (T = period / rate), and then
 * TAT = max(TAT, now) + T. Whole tokens left = (now + burst*T - TAT) / T.
 * Being one word, the global bucket needs no lock: a compare-and-swap loop
 * updates it. Time is counted in units of T/1024 since the limiter was
 * created, so T is an exact integer (no rounding drift however long the
 * daemon runs) and a 64-bit TAT lasts decades at the highest allowed rate.
 *
 * Keyed buckets: a hash table (SipHash with a random key, so clients cannot
 * aim their keys at one chain) split in shards of at least 64 buckets,
 * each with its mutex, its part of max_keys and an LRU list. A new key in a
 * full shard takes the place of a bucket that is full again (idle long
 * enough to have refilled: forgetting it changes nothing), looking at the
 * 8 least recently used; when none is, the request is counted against the
 * limiter's overflow bucket (the same rate, shared by every key that could
 * not be stored), so a flood of new keys is limited instead of evicting
 * the buckets of active clients (which would reset their limits).
 */
#include "gw_ratelimit.h"
#include "gw_http.h"
#include "gw_realip.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <time.h>

/* Units of time per token (T). */
#define SCALE          1024u
#define SHARDS_MAX     64
#define SHARD_MIN_KEYS 64
/* Keys are stored up to this many bytes; longer ones as a prefix plus a second hash. */
#define KEY_MAX 128
/* Least recently used buckets looked at for one that is full. */
#define EVICT_SCAN 8

typedef struct entry_s entry_t;
struct entry_s {
    entry_t *hnext;       /* hash chain */
    entry_t *prev, *next; /* LRU list: head is the most recently used */
    uint64_t hash;
    uint64_t tat;
    uint32_t len;
    char key[KEY_MAX];
};

typedef struct {
    pthread_mutex_t mu;
    entry_t **table;
    size_t mask;
    entry_t *head, *tail;
    size_t n, cap;
    char pad[64]; /* keeps shards' mutexes off one cache line */
} shard_t;

struct gw_ratelimit_s {
    int refcnt; /* atomic */
    gw_ratelimit_conf_t conf;
    uint64_t base_ns;      /* creation time: units count from it */
    uint64_t cap_u;        /* burst * SCALE */
    uint64_t tat;          /* the global bucket; atomic */
    uint64_t overflow_tat; /* keys that found no room; atomic */
    uint64_t k0, k1;       /* SipHash key */
    shard_t *shards;
    size_t nshards;
};

/* --- SipHash-2-4 ----------------------------------------------------------- */

#define ROTL(x, b) (uint64_t)(((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                                       \
    do {                                                                                                               \
        v0 += v1;                                                                                                      \
        v1 = ROTL(v1, 13);                                                                                             \
        v1 ^= v0;                                                                                                      \
        v0 = ROTL(v0, 32);                                                                                             \
        v2 += v3;                                                                                                      \
        v3 = ROTL(v3, 16);                                                                                             \
        v3 ^= v2;                                                                                                      \
        v0 += v3;                                                                                                      \
        v3 = ROTL(v3, 21);                                                                                             \
        v3 ^= v0;                                                                                                      \
        v2 += v1;                                                                                                      \
        v1 = ROTL(v1, 17);                                                                                             \
        v1 ^= v2;                                                                                                      \
        v2 = ROTL(v2, 32);                                                                                             \
    } while (0)

static uint64_t
siphash(uint64_t k0, uint64_t k1, const char *data, size_t len)
{
    const unsigned char *in = (const unsigned char *)data;
    uint64_t v0 = 0x736f6d6570736575ULL ^ k0, v1 = 0x646f72616e646f6dULL ^ k1;
    uint64_t v2 = 0x6c7967656e657261ULL ^ k0, v3 = 0x7465646279746573ULL ^ k1;
    uint64_t b = (uint64_t)len << 56;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t m = 0;
        for (int j = 7; j >= 0; j--)
            m = (m << 8) | in[i + (size_t)j];
        v3 ^= m;
        SIPROUND;
        SIPROUND;
        v0 ^= m;
    }
    for (size_t j = 0; i + j < len; j++)
        b |= (uint64_t)in[i + j] << (8 * j);
    v3 ^= b;
    SIPROUND;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

/* --- life ------------------------------------------------------------------ */

static size_t
pow2_at_least(size_t n)
{
    size_t p = 1;
    while (p < n)
        p <<= 1;
    return p;
}

gw_ratelimit_t *
gw_ratelimit_new(const gw_ratelimit_conf_t *conf)
{
    gw_ratelimit_t *rl = gw_calloc(1, sizeof(*rl));
    rl->refcnt = 1;
    rl->conf = *conf;
    rl->conf.header = conf->header ? gw_strdup(conf->header) : NULL;
    rl->base_ns = gw_now_ns();
    rl->cap_u = (uint64_t)conf->burst * SCALE;
    uint64_t seed[2];
    if (getrandom(seed, sizeof(seed), GRND_NONBLOCK) != (ssize_t)sizeof(seed)) {
        seed[0] = rl->base_ns ^ (uint64_t)(uintptr_t)rl;
        seed[1] = (uint64_t)time(NULL) * 0x9e3779b97f4a7c15ULL;
    }
    rl->k0 = seed[0];
    rl->k1 = seed[1];
    if (conf->key != GW_RL_KEY_GLOBAL) {
        size_t ns = conf->max_keys / SHARD_MIN_KEYS;
        ns = ns < 1 ? 1 : ns > SHARDS_MAX ? SHARDS_MAX : ns;
        while (ns & (ns - 1))
            ns &= ns - 1; /* a power of two */
        rl->nshards = ns;
        rl->shards = gw_calloc(ns, sizeof(shard_t));
        for (size_t i = 0; i < ns; i++) {
            shard_t *s = &rl->shards[i];
            pthread_mutex_init(&s->mu, NULL);
            s->cap = conf->max_keys / ns + (i < conf->max_keys % ns);
            size_t slots = pow2_at_least(s->cap);
            s->table = gw_calloc(slots, sizeof(entry_t *));
            s->mask = slots - 1;
        }
    }
    return rl;
}

gw_ratelimit_t *
gw_ratelimit_ref(gw_ratelimit_t *rl)
{
    __atomic_add_fetch(&rl->refcnt, 1, __ATOMIC_RELAXED);
    return rl;
}

void
gw_ratelimit_unref(gw_ratelimit_t *rl)
{
    if (rl == NULL || __atomic_sub_fetch(&rl->refcnt, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    for (size_t i = 0; i < rl->nshards; i++) {
        shard_t *s = &rl->shards[i];
        for (entry_t *e = s->head, *next; e; e = next) {
            next = e->next;
            free(e);
        }
        free(s->table);
        pthread_mutex_destroy(&s->mu);
    }
    free(rl->shards);
    free(rl->conf.header);
    free(rl);
}

const gw_ratelimit_conf_t *
gw_ratelimit_conf(const gw_ratelimit_t *rl)
{
    return &rl->conf;
}

/* --- buckets --------------------------------------------------------------- */

/* The GCRA step: true and *tat moved on when a token was there, else false
 * and *wait the units until one is. */
static bool
gcra(uint64_t *tat, uint64_t now, uint64_t cap, uint64_t *wait)
{
    uint64_t next = (*tat > now ? *tat : now) + SCALE;
    if (next - now > cap) {
        *wait = next - now - cap;
        return false;
    }
    *tat = next;
    return true;
}

/* Units to milliseconds, rounded up. */
static uint64_t
units_ms(const gw_ratelimit_t *rl, uint64_t u)
{
    unsigned __int128 d = (unsigned __int128)rl->conf.rate * SCALE;
    return (uint64_t)(((unsigned __int128)u * (unsigned)rl->conf.period_ms + d - 1) / d);
}

static void
result(const gw_ratelimit_t *rl, bool ok, uint64_t tat, uint64_t now, uint64_t wait, gw_ratelimit_result_t *res)
{
    res->admitted = ok;
    if (ok) {
        res->remaining = (unsigned)((now + rl->cap_u - tat) / SCALE);
        res->reset_ms = units_ms(rl, tat - now);
    } else {
        res->remaining = 0;
        res->reset_ms = units_ms(rl, wait);
    }
}

/* A bucket that is one atomic word (the global one, the overflow one). */
static void
take_atomic(gw_ratelimit_t *rl, uint64_t *word, uint64_t now, gw_ratelimit_result_t *res)
{
    uint64_t old = __atomic_load_n(word, __ATOMIC_RELAXED), wait = 0;
    for (;;) {
        uint64_t tat = old;
        if (!gcra(&tat, now, rl->cap_u, &wait)) {
            result(rl, false, old, now, wait, res);
            return;
        }
        if (__atomic_compare_exchange_n(word, &old, tat, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
            result(rl, true, tat, now, 0, res);
            return;
        }
    }
}

static void
lru_unlink(shard_t *s, entry_t *e)
{
    if (e->prev)
        e->prev->next = e->next;
    else
        s->head = e->next;
    if (e->next)
        e->next->prev = e->prev;
    else
        s->tail = e->prev;
    e->prev = e->next = NULL;
}

static void
lru_push(shard_t *s, entry_t *e)
{
    e->prev = NULL;
    e->next = s->head;
    if (s->head)
        s->head->prev = e;
    s->head = e;
    if (s->tail == NULL)
        s->tail = e;
}

static void
hash_unlink(shard_t *s, entry_t *e)
{
    entry_t **pp = &s->table[(e->hash >> 8) & s->mask];
    while (*pp != e)
        pp = &(*pp)->hnext;
    *pp = e->hnext;
}

/* A bucket for a new key in a full shard: a full one among the least
 * recently used, unlinked; NULL when none is. */
static entry_t *
evict(shard_t *s, uint64_t now)
{
    entry_t *e = s->tail;
    for (int i = 0; e != NULL && i < EVICT_SCAN; i++, e = e->prev) {
        if (e->tat <= now) {
            hash_unlink(s, e);
            lru_unlink(s, e);
            s->n--;
            return e;
        }
    }
    return NULL;
}

static void
take_keyed(gw_ratelimit_t *rl, const char *key, size_t len, uint64_t now, gw_ratelimit_result_t *res)
{
    char kbuf[KEY_MAX + 1];
    uint64_t h = siphash(rl->k0, rl->k1, key, len);
    if (len > KEY_MAX) {
        /* a prefix and a second, independent hash of the whole key */
        uint64_t h2 = siphash(rl->k1, rl->k0 ^ 0x5bd1e995u, key, len);
        memcpy(kbuf, key, KEY_MAX - 17);
        snprintf(kbuf + KEY_MAX - 17, 18, "#%016llx", (unsigned long long)h2);
        key = kbuf;
        len = KEY_MAX;
    }
    shard_t *s = &rl->shards[(h >> 56) & (rl->nshards - 1)];
    pthread_mutex_lock(&s->mu);
    entry_t *e = s->table[(h >> 8) & s->mask];
    while (e && !(e->hash == h && e->len == len && memcmp(e->key, key, len) == 0))
        e = e->hnext;
    if (e == NULL) {
        if (s->n >= s->cap) {
            e = evict(s, now);
            if (e == NULL) {
                pthread_mutex_unlock(&s->mu);
                take_atomic(rl, &rl->overflow_tat, now, res);
                return;
            }
        } else {
            e = gw_malloc(sizeof(*e));
        }
        e->hash = h;
        e->len = (uint32_t)len;
        memcpy(e->key, key, len);
        e->tat = 0; /* full */
        size_t slot = (h >> 8) & s->mask;
        e->hnext = s->table[slot];
        s->table[slot] = e;
        s->n++;
    } else {
        lru_unlink(s, e);
    }
    lru_push(s, e);
    uint64_t wait = 0;
    bool ok = gcra(&e->tat, now, rl->cap_u, &wait);
    uint64_t tat = e->tat;
    pthread_mutex_unlock(&s->mu);
    result(rl, ok, tat, now, wait, res);
}

void
gw_ratelimit_take(gw_ratelimit_t *rl, const char *key, size_t len, uint64_t now_ns, gw_ratelimit_result_t *res)
{
    uint64_t since = now_ns > rl->base_ns ? now_ns - rl->base_ns : 0;
    /* rate / period is at most 10^7 per second (checked at load), so this
     * is at most 10.24 units per ns: 57 years of uptime fit. */
    uint64_t now =
        (uint64_t)((unsigned __int128)since * rl->conf.rate * SCALE / ((uint64_t)rl->conf.period_ms * 1000000u));
    if (rl->conf.key == GW_RL_KEY_GLOBAL)
        take_atomic(rl, &rl->tat, now, res);
    else
        take_keyed(rl, key, len, now, res);
}

unsigned
gw_ratelimit_admit(gw_ratelimit_t *rl, const gw_config_t *cfg, gw_req_t *r, const char *peer_ip, char *hdr, size_t cap,
                   size_t *hlen)
{
    const char *key = "";
    size_t len = 0;
    if (rl->conf.key == GW_RL_KEY_CLIENT) {
        key = gw_realip_get(cfg, r, peer_ip);
        len = strlen(key);
    } else if (rl->conf.key == GW_RL_KEY_HEADER) {
        key = gw_req_header(r, rl->conf.header, &len);
        if (key == NULL) {
            key = ""; /* requests without the header share the empty key */
            len = 0;
        }
    }
    gw_ratelimit_result_t res;
    gw_ratelimit_take(rl, key, len, gw_now_ns(), &res);
    uint64_t reset_s = (res.reset_ms + 999) / 1000;
    int n = snprintf(hdr, cap, "RateLimit-Limit: %u\r\nRateLimit-Remaining: %u\r\nRateLimit-Reset: %llu\r\n",
                     rl->conf.rate, res.remaining, (unsigned long long)reset_s);
    *hlen = n < 0 ? 0 : GW_MIN((size_t)n, cap - 1);
    if (res.admitted)
        return 0;
    return reset_s < 1 ? 1 : reset_s > 86400 ? 86400 : (unsigned)reset_s;
}

size_t
gw_ratelimit_nkeys(gw_ratelimit_t *rl)
{
    size_t n = 0;
    for (size_t i = 0; i < rl->nshards; i++) {
        pthread_mutex_lock(&rl->shards[i].mu);
        n += rl->shards[i].n;
        pthread_mutex_unlock(&rl->shards[i].mu);
    }
    return n;
}

static bool
same_conf(const gw_ratelimit_conf_t *a, const gw_ratelimit_conf_t *b)
{
    return a->rate == b->rate && a->period_ms == b->period_ms && a->burst == b->burst && a->key == b->key &&
           a->max_keys == b->max_keys &&
           (a->header == NULL ? b->header == NULL : b->header != NULL && strcasecmp(a->header, b->header) == 0);
}

void
gw_ratelimit_inherit(gw_config_t *newc, const gw_config_t *oldc)
{
    if (oldc == NULL)
        return;
    for (size_t i = 0; i < newc->nroutes; i++) {
        gw_route_t *nr = newc->routes[i];
        if (nr->ratelimit == NULL)
            continue;
        for (size_t j = 0; j < oldc->nroutes; j++) {
            const gw_route_t *o = oldc->routes[j];
            if (o->ratelimit == NULL || o->ratelimit == nr->ratelimit || o->methods != nr->methods ||
                strcmp(o->pattern, nr->pattern) != 0 || !same_conf(&o->ratelimit->conf, &nr->ratelimit->conf))
                continue;
            gw_ratelimit_unref(nr->ratelimit);
            nr->ratelimit = gw_ratelimit_ref(o->ratelimit);
            break;
        }
    }
}
