/*
 * gw_cluster.h - the servers of a backend: which one a try goes to
 * ("balance"), and each server's shared state (health by active checks,
 * passive outlier ejection, in-flight requests, counters).
 *
 * Two kinds of state:
 *   - gw_cluster_t, per configuration and backend (b->cluster): the
 *     consistent-hash ring and total weights, built once at load and then
 *     immutable, plus the round-robin current weights of each worker,
 *     rr[worker * nservers + server], read and written by that worker's
 *     thread only (no lock, no atomics).
 *   - gw_hserver_t, per server (s->hs), shared by every worker and the
 *     health checker (gw_hcheck.h): C11 atomics, reference counted. A reload
 *     hands an unchanged server's gw_hserver_t to the new configuration
 *     (gw_cluster_inherit), so health, ejection and counters survive it.
 *
 * Usable: a server is usable when its active checks say healthy (always,
 * without "health_check") and it is not ejected. A new server (at start, or
 * added by a reload) starts healthy, as in nginx: a gateway that starts, or
 * reloads, must not refuse traffic before a first round of checks has run.
 * Its first check runs at once (gw_hcheck.h), so a server that is really
 * down is taken out after "unhealthy" checks, the first one immediately.
 * (Envoy starts hosts unhealthy until a first check passes; with every
 * server of a new backend unknown, that refuses all traffic for a while.)
 *
 * Balance ("round_robin", "least_request", "hash") picks among the usable
 * primaries; backups get traffic only when no primary is usable (then by
 * smooth weighted round robin among the usable backups, whatever the
 * balance). Round robin is nginx's smooth weighted round robin
 * (ngx_http_upstream_get_peer): each candidate's current weight grows by its
 * weight, the largest is picked and loses the candidates' total, so
 * weights {5, 1, 1} give a a b a c a a. Servers that are not candidates (not
 * usable, already tried) are left out of the round, as nginx skips down
 * peers; nginx's effective_weight, lowered by failures, is not kept: passive
 * failures are outlier detection's business. least_request is Envoy's:
 * two random candidates (weighted choice is not needed for the draw), the
 * one with the lower in-flight / weight wins (in-flight + 1 over weight,
 * compared by cross-multiplication; equal weights compare in-flight). hash:
 * a ketama-style ring of 40 points per unit of weight (capped so a ring
 * has at most GW_CLUSTER_RING_MAX points), primaries only; the key's hash
 * finds the first point clockwise, and when that server is not a candidate
 * the walk goes on clockwise to the next candidate. So removing one of N
 * servers moves about 1/N of the keys and no key moves between two servers
 * that both stayed.
 *
 * Outlier detection ("outlier_detection", passive): gw_cluster_report()
 * counts each try's outcome. Connect failures (and name resolution and TLS
 * failures), resets, truncated answers, timeouts and 5xx statuses are
 * failures; any other outcome of a sent try is a success and resets the
 * count. After consecutive_failures failures in a row the server is ejected
 * for eject_ms * 2^(k-1) (k: its ejections in a row), at most max_eject_ms;
 * it is usable again when that time has passed (checked lazily by
 * gw_cluster_usable: no timer). k decays: an ejection that comes more than
 * max_eject_ms after the previous one ended starts again at k = 1.
 * The cap is Envoy's rule (DetectorImpl::ejectHost without
 * always_eject_one_host): eject only when 100 * (ejected now + 1) / n <=
 * max_ejected_percent, n = all servers of the backend (primaries and
 * backups). So when the cap allows no server at all (n = 1 at 50%, or 0%),
 * nothing is ejected; with n = 3 at 50% at most one. A failure run that
 * reaches the threshold when the cap refuses starts counting anew.
 *
 * A server named by host name is one server here, whatever its DNS answer:
 * it is balanced with its configured weight, and its pool spreads that
 * server's requests evenly over the name's addresses (gw_upstream.h), so
 * each address gets weight / naddrs. Health checks and outlier detection
 * are the server's too: a check goes to the next address in turn and its
 * result is the server's, a failure on any address counts for the server,
 * and an address is never ejected on its own (only a failed connect makes
 * the pool skip it for GW_DNS_ADDR_DOWN_MS). nginx makes each address of a
 * server's name a peer of its own, with the server's weight each (so the
 * name's share grows with its answer) and max_fails per address; Envoy's
 * STRICT_DNS makes each address a host, balanced, checked and ejected
 * alone. gatherd keeps the unit the configuration names: the weight the
 * operator wrote holds whatever the answer's size, the servers' shared
 * state is made once per configuration (an answer that changes every TTL
 * would otherwise create and drop servers, with their health, ejection and
 * metrics labels, on every worker), and the ejection cap counts the
 * servers written. Accepted: an address that accepts connections but
 * answers badly is not taken out alone; list such instances as servers by
 * IP address when they must be judged one by one.
 */
#ifndef GW_CLUSTER_H
#define GW_CLUSTER_H

#include "gw_core.h"
#include "gw_fail.h"

/* The hash ring: points per unit of weight, and most points per backend
 * (the per-weight count is lowered for large total weights). */
#define GW_CLUSTER_RING_POINTS 40
#define GW_CLUSTER_RING_MAX    16384

/* What one active health check found (gw_hcheck.h). */
typedef enum {
    GW_HC_OK = 0,       /* a status of "statuses" */
    GW_HC_STATUS,       /* another status */
    GW_HC_TIMEOUT,      /* no status line within timeout_ms */
    GW_HC_CONNECT,      /* refused, reset, or the name did not resolve */
    GW_HC_TLS,          /* the TLS handshake or verification failed */
    GW_HC_BAD_RESPONSE, /* not an HTTP status line (or too long a head) */
    GW_HC_MAX
} gw_hc_result_t;

/* For /metrics and /status: a snapshot of a server's shared state (each
 * field read atomically; the fields together are not one instant). */
typedef struct {
    bool healthy;                   /* by active checks (true without them) */
    bool ejected;                   /* by outlier detection, now */
    uint64_t ejected_for_ms;        /* while ejected: until it returns; else 0 */
    unsigned ejections_in_row;      /* k of the last ejection (decays, see above) */
    unsigned consecutive_failures;  /* passive failures in a row */
    unsigned check_successes;       /* active checks passed in a row */
    unsigned check_failures;        /* active checks failed in a row */
    int inflight;                   /* tries in progress, all workers */
    uint64_t requests;              /* tries reported */
    uint64_t failures[GW_FAIL_MAX]; /* tries reported, by failure code ([GW_FAIL_NONE]: successes) */
    uint64_t ejections;             /* times ejected */
    uint64_t checks[GW_HC_MAX];     /* active checks, by result */
} gw_hserver_stats_t;

/* --- per-configuration part (gw_config.c) -------------------------------- */

/*
 * Builds b->cluster from b's servers (their weights and backup flags, which
 * must be set) for workers worker threads; every server must have its hs
 * set (gw_hserver_new). Returns a new object owned by b, freed with
 * gw_cluster_free() (NULL is ignored).
 */
gw_cluster_t *gw_cluster_new(const gw_backend_t *b, int workers);
void gw_cluster_free(gw_cluster_t *cl);

/* A new shared state (one reference): healthy, not ejected, counters 0. */
gw_hserver_t *gw_hserver_new(void);
gw_hserver_t *gw_hserver_ref(gw_hserver_t *hs);
/* Drops a reference; the last frees it. NULL is ignored. */
void gw_hserver_unref(gw_hserver_t *hs);

/*
 * At a reload, on the main thread, before newc is published: every server
 * of newc whose backend (same name) in oldc has a server with the same URL,
 * and whose backend's health_check and outlier_detection settings equal
 * the old one's, shares the old server's gw_hserver_t (health, ejection,
 * counters). Others keep their fresh state. The checker (gw_hcheck.h)
 * switches to newc afterwards.
 */
void gw_cluster_inherit(gw_config_t *newc, const gw_config_t *oldc);
/* Whether two backends' health-relevant settings (health_check and
 * outlier_detection) are equal. */
bool gw_cluster_health_conf_equal(const gw_backend_t *a, const gw_backend_t *b);

/* --- the request path ----------------------------------------------------- */

/*
 * Picks the server for a try of a call to b: GW_OK with *si set (an index
 * into b->servers), GW_AGAIN when no server is usable (the caller fails the
 * call with no_healthy_server).
 * tried: bit i set = server i was already tried by this call: an untried
 * usable server is preferred; when every usable one was tried, one of them
 * is picked anyway (balanced as usual).
 * hash/has_hash: for GW_BAL_HASH, the hash of the rendered hash_key
 * (gw_cluster_hash); without it (has_hash false), hash balance falls back
 * to round robin.
 * Called on worker w's thread only (w->id selects its round-robin state;
 * w->id < the workers given to gw_cluster_new).
 */
int gw_cluster_pick(gw_worker_t *w, const gw_backend_t *b, uint64_t hash, bool has_hash, uint32_t tried,
                    uint64_t now_ms, unsigned *si);

/* The same with the worker given by its id (unit tests, and callers without
 * a gw_worker_t). */
int gw_cluster_pick_id(int wid, const gw_backend_t *b, uint64_t hash, bool has_hash, uint32_t tried, uint64_t now_ms,
                       unsigned *si);

/* A 64-bit hash of p[0..len) (FNV-1a, then murmur3's fmix64 finalizer so
 * every input bit reaches every output bit). Used for hash_key and the ring. */
uint64_t gw_cluster_hash(const void *p, size_t len);

/* Whether s may take a try now: healthy by its active checks and not
 * ejected (an ejection whose time passed is over). Any thread. */
bool gw_cluster_usable(const gw_peer_t *s, uint64_t now_ms);

/* A try to s starts (delta +1) or ends (-1), whatever its outcome:
 * least_request reads these. Any thread (atomic). */
void gw_cluster_inflight(const gw_peer_t *s, int delta);

/*
 * The outcome of one try sent to s of b: code GW_FAIL_NONE for success,
 * else the failure (gw_fail.h), status the backend's status (0: none).
 * Counts it (per code) and runs outlier detection: only connect failures
 * (CONNECT_FAILED, RESOLVE_FAILED, TLS_FAILED), resets (RESET, TRUNCATED,
 * BAD_RESPONSE), timeouts and 5xx (BAD_STATUS with status >= 500) count
 * toward ejection; any other outcome resets the count. Local failures
 * (queue, circuit, cancelled) should not be reported: nothing was learnt
 * about the server (they are counted but change nothing). Any thread.
 */
void gw_cluster_report(const gw_backend_t *b, const gw_peer_t *s, gw_fail_t code, int status, uint64_t now_ms);

/* --- the health checker (gw_hcheck.c) -------------------------------------- */

/*
 * The result of one active check of s (b's health_check): counts it and
 * applies the thresholds. Returns +1 when s just became healthy, -1 when it
 * just became unhealthy, 0 when its state did not change; *in_row (may be
 * NULL) gets the successes or failures in a row that the result belongs
 * to. Called by the checker only (one thread).
 */
int gw_cluster_checked(const gw_backend_t *b, const gw_peer_t *s, gw_hc_result_t r, unsigned *in_row);
/* "ok", "status", "timeout", "connect", "tls", "bad_response". Static. */
const char *gw_hc_result_name(gw_hc_result_t r);

/* --- observability ---------------------------------------------------------- */

/* A snapshot of s's shared state at now_ms. */
void gw_cluster_stats(const gw_peer_t *s, uint64_t now_ms, gw_hserver_stats_t *out);
/* "round_robin", "least_request", "hash". Static. */
const char *gw_cluster_balance_name(int balance);

#endif
