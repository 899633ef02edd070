/*
 * gw_admin.c - the admin listener (see gw_admin.h).
 *
 * Every second the thread sums the workers' counters into a ring of
 * snapshots (RING entries); /status reports the "recent" figures (rate,
 * error share, mean and 95th percentile latency) as the difference between
 * the newest snapshot and the one RING-1 seconds older, so they describe
 * the last ten seconds and not the whole uptime.
 */
#include "gw_admin.h"
#include "gw_budget.h"

#include "gw_breaker.h"
#include "gw_cache.h"
#include "gw_cluster.h"
#include "gw_config.h"
#include "gw_inflight.h"
#include "gw_log.h"
#include "gw_metrics.h"
#include "gw_retry.h"
#include "gw_server.h"

#include <dirent.h>
#include <errno.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <jansson.h>
#include <llhttp.h>
#include <openssl/opensslv.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#define RING 11 /* snapshots one second apart: ten seconds of "recent" */

/* One snapshot: every slot's latency histogram and error count. */
typedef struct {
    gw_hist_t h;
    uint64_t errors;
} snap_t;

typedef struct {
    snap_t routes[GW_M_ROUTES];
    snap_t backends[GW_M_BACKENDS];
    uint64_t at_ms; /* 0: not taken yet */
} ring_t;

static struct {
    bool running;
    pthread_t thread;
    struct event_base *base;
    struct evhttp *http;
    int stop_fd;               /* eventfd: the main thread asks the thread to leave */
    struct event *stop_ev;
    struct event *tick;        /* the snapshot timer */
    ring_t *ring;              /* [RING] */
    unsigned ring_next;
    gw_server_t *srv;
    pthread_mutex_t mtx;       /* guards cfg */
    gw_config_t *cfg;
    bool draining;             /* atomic */
    time_t started;
    uint64_t started_ms;
} adm = { .stop_fd = -1, .mtx = PTHREAD_MUTEX_INITIALIZER };

static gw_config_t *
cfg_get(void)
{
    pthread_mutex_lock(&adm.mtx);
    gw_config_t *cfg = adm.cfg ? gw_config_ref(adm.cfg) : NULL;
    pthread_mutex_unlock(&adm.mtx);
    return cfg;
}

void
gw_admin_publish(gw_config_t *cfg)
{
    gw_config_ref(cfg);
    pthread_mutex_lock(&adm.mtx);
    gw_config_t *old = adm.cfg;
    adm.cfg = cfg;
    pthread_mutex_unlock(&adm.mtx);
    gw_config_unref(old);
}

void
gw_admin_drain(void)
{
    __atomic_store_n(&adm.draining, true, __ATOMIC_RELAXED);
}

/* Requests in flight: the sum of the workers' deltas. */
static int64_t
inflight_now(void)
{
    int64_t n = 0;
    for (int w = 0; w < adm.srv->nworkers; w++)
        n += __atomic_load_n(&gw_metrics_worker(w)->inflight, __ATOMIC_RELAXED);
    return n;
}

/* --- snapshots ------------------------------------------------------------ */

static uint64_t
backend_failures(const gw_mbackend_t *b)
{
    uint64_t n = 0;
    for (unsigned k = 0; k < GW_OUT_MAX; k++)
        if (k != GW_OUT_OK && k != GW_OUT_CANCELLED)
            n += b->outcome[k];
    return n;
}

static void
tick_cb(evutil_socket_t fd, short what, void *arg)
{
    GW_UNUSED(fd);
    GW_UNUSED(what);
    GW_UNUSED(arg);
    ring_t *r = &adm.ring[adm.ring_next];
    unsigned nr = gw_metrics_nroutes(), nb = gw_metrics_nbackends();
    for (unsigned i = 0; i < nr; i++) {
        gw_mroute_t m;
        gw_metrics_route_sum(i, &m);
        r->routes[i].h = m.latency;
        r->routes[i].errors = m.status[4];
    }
    for (unsigned i = 0; i < nb; i++) {
        gw_mbackend_t m;
        gw_metrics_backend_sum(i, &m);
        r->backends[i].h = m.latency;
        r->backends[i].errors = backend_failures(&m);
    }
    r->at_ms = gw_now_ms();
    adm.ring_next = (adm.ring_next + 1) % RING;
}

static uint64_t
hist_count(const gw_hist_t *h)
{
    uint64_t n = 0;
    for (unsigned b = 0; b <= GW_M_NBOUNDS; b++)
        n += h->n[b];
    return n;
}

/* The recent figures of one slot: from the oldest snapshot of the ring to
 * the newest. */
static json_t *
recent(bool route, unsigned mid)
{
    const ring_t *newest = &adm.ring[(adm.ring_next + RING - 1) % RING];
    const ring_t *oldest = &adm.ring[adm.ring_next];
    if (oldest->at_ms == 0)
        oldest = &adm.ring[0]; /* the ring is not full yet */
    if (newest->at_ms == 0 || newest == oldest || newest->at_ms <= oldest->at_ms)
        return json_null();
    const snap_t *a = route ? &oldest->routes[mid] : &oldest->backends[mid];
    const snap_t *b = route ? &newest->routes[mid] : &newest->backends[mid];
    gw_hist_t d;
    for (unsigned k = 0; k <= GW_M_NBOUNDS; k++)
        d.n[k] = b->h.n[k] - a->h.n[k];
    d.sum_us = b->h.sum_us - a->h.sum_us;
    uint64_t n = hist_count(&d), errors = b->errors - a->errors;
    double secs = (double)(newest->at_ms - oldest->at_ms) / 1000.0;
    json_t *o = json_object();
    json_object_set_new(o, "seconds", json_real(secs));
    json_object_set_new(o, "per_second", json_real(n / secs));
    json_object_set_new(o, "error_ratio", n ? json_real((double)errors / (double)n) : json_null());
    json_object_set_new(o, "mean_ms", n ? json_real((double)d.sum_us / (double)n / 1000.0) : json_null());
    if (n) {
        /* the 95th percentile, interpolated linearly inside its bucket as
         * Prometheus' histogram_quantile() does (the bucket's upper bound
         * alone read 100 ms next to a mean of 12 ms); past the last bound,
         * that bound */
        uint64_t want = (n * 95 + 99) / 100, cum = 0;
        unsigned k = 0;
        for (; k < GW_M_NBOUNDS; k++) {
            if (cum + d.n[k] >= want)
                break;
            cum += d.n[k];
        }
        double p95_us;
        if (k == GW_M_NBOUNDS) {
            p95_us = (double)gw_m_bounds_us[GW_M_NBOUNDS - 1];
        } else {
            double lo = k ? (double)gw_m_bounds_us[k - 1] : 0.0, hi = (double)gw_m_bounds_us[k];
            p95_us = lo + (hi - lo) * (double)(want - cum) / (double)d.n[k];
        }
        json_object_set_new(o, "p95_ms", json_real(p95_us / 1000.0));
    } else {
        json_object_set_new(o, "p95_ms", json_null());
    }
    return o;
}

/* --- /status -------------------------------------------------------------- */

static const char *
kind_name(gw_route_kind_t k)
{
    return k == GW_ROUTE_PROXY ? "proxy" : k == GW_ROUTE_AGGREGATE ? "aggregate" : "respond";
}

static json_t *
route_json(const gw_route_t *rt)
{
    static const char *const classes[] = { "1xx", "2xx", "3xx", "4xx", "5xx", "other" };
    gw_mroute_t m;
    gw_metrics_route_sum(rt->mid, &m);
    json_t *o = json_object();
    json_object_set_new(o, "path", json_string(rt->pattern));
    json_object_set_new(o, "kind", json_string(kind_name(rt->kind)));
    json_t *methods = json_array();
    if (rt->methods == ~(uint64_t)0)
        json_array_append_new(methods, json_string("*"));
    else
        for (int k = 0; k < 64; k++)
            if (rt->methods & ((uint64_t)1 << k))
                json_array_append_new(methods, json_string(llhttp_method_name((llhttp_method_t)k)));
    json_object_set_new(o, "methods", methods);
    if (rt->kind == GW_ROUTE_PROXY)
        json_object_set_new(o, "backend", json_string(rt->proxy.backend->name));
    if (rt->kind == GW_ROUTE_AGGREGATE) {
        json_t *calls = json_array();
        for (size_t k = 0; k < rt->agg.ncalls; k++) {
            json_t *call = json_pack("{s:s, s:s, s:b}", "name", rt->agg.calls[k]->name, "backend",
                                     rt->agg.calls[k]->backend->name, "required", rt->agg.calls[k]->required);
            json_t *cache = gw_cache_call_json(rt->agg.calls[k]); /* its counters, when it caches or coalesces */
            if (cache)
                json_object_set_new(call, "cache", cache);
            json_array_append_new(calls, call);
        }
        json_object_set_new(o, "calls", calls);
        json_object_set_new(o, "deadline_ms", json_integer(rt->agg.deadline_ms));
    }
    json_t *status = json_object();
    uint64_t total = 0;
    for (unsigned k = 0; k < GW_NELEM(classes); k++) {
        json_object_set_new(status, classes[k], json_integer((json_int_t)m.status[k]));
        total += m.status[k];
    }
    json_object_set_new(o, "requests", json_integer((json_int_t)total));
    json_object_set_new(o, "status", status);
    json_object_set_new(o, "rate_limited", json_integer((json_int_t)m.rate_limited));
    json_object_set_new(o, "recent", recent(true, rt->mid));
    return o;
}

/* A server's failures by code name: gw_fail_t codes that share a name
 * (queue_full) are added together, so each name is one series and one JSON
 * key. Fills names/counts (GW_FAIL_MAX entries) with the nonzero ones and
 * returns how many. */
static size_t
failures_by_name(const gw_hserver_stats_t *st, const char **names, uint64_t *counts)
{
    size_t n = 0;
    for (unsigned k = GW_FAIL_NONE + 1; k < GW_FAIL_MAX; k++) {
        if (st->failures[k] == 0)
            continue;
        const char *name = gw_fail_name((gw_fail_t)k);
        size_t j = 0;
        while (j < n && strcmp(names[j], name) != 0)
            j++;
        if (j == n) {
            names[n] = name;
            counts[n++] = 0;
        }
        counts[j] += st->failures[k];
    }
    return n;
}

/* The servers of b, with their shared state (gw_cluster.h) and their
 * connections summed over the workers. */
static json_t *
servers_json(const gw_backend_t *b)
{
    uint64_t now = gw_now_ms();
    json_t *arr = json_array();
    for (size_t i = 0; i < b->nservers; i++) {
        const gw_peer_t *s = &b->servers[i];
        gw_hserver_stats_t st;
        gw_cluster_stats(s, now, &st);
        gw_mserver_t ms = { 0, 0 };
        if (s->mid != GW_M_SERVER_OTHER)
            gw_metrics_server_sum(s->mid, &ms);
        const char *names[GW_FAIL_MAX];
        uint64_t counts[GW_FAIL_MAX];
        size_t nf = failures_by_name(&st, names, counts);
        json_t *failures = json_object();
        for (size_t k = 0; k < nf; k++)
            json_object_set_new(failures, names[k], json_integer((json_int_t)counts[k]));
        json_t *o = json_object();
        json_object_set_new(o, "url", json_string(s->url));
        json_object_set_new(o, "label", json_string(s->label));
        json_object_set_new(o, "weight", json_integer(s->weight));
        json_object_set_new(o, "backup", json_boolean(s->backup));
        json_object_set_new(o, "healthy", json_boolean(st.healthy));
        json_object_set_new(o, "ejected", json_boolean(st.ejected));
        json_object_set_new(o, "ejected_ms_left", json_integer((json_int_t)st.ejected_for_ms));
        json_object_set_new(o, "in_flight", json_integer(st.inflight));
        json_object_set_new(o, "requests", json_integer((json_int_t)st.requests));
        json_object_set_new(o, "failures", failures);
        json_object_set_new(o, "connections", s->mid == GW_M_SERVER_OTHER
                                                  ? json_null()
                                                  : json_pack("{s:I, s:I}", "open", (json_int_t)ms.open, "idle",
                                                              (json_int_t)ms.idle));
        json_array_append_new(arr, o);
    }
    return arr;
}

static json_t *
backend_json(const gw_backend_t *b)
{
    gw_mbackend_t m;
    gw_metrics_backend_sum(b->mid, &m);
    json_t *o = json_object();
    json_object_set_new(o, "name", json_string(b->name));
    json_object_set_new(o, "url", json_string(b->url));
    json_object_set_new(o, "timeout_ms", json_integer(b->timeout_ms));
    json_object_set_new(o, "pool", json_pack("{s:I, s:I, s:I, s:I, s:I, s:I}", "active", (json_int_t)m.active, "idle",
                                             (json_int_t)m.idle, "queued", (json_int_t)m.queued, "opened",
                                             (json_int_t)m.opened, "queue_rejected", (json_int_t)m.queue_rejected,
                                             "max_connections_per_worker", (json_int_t)b->max_connections));
    gw_breaker_stats_t bs;
    bool has_breaker = gw_breaker_stats(b, &bs);
    if (has_breaker)
        json_object_set_new(o, "breaker", json_pack("{s:s, s:I, s:i}", "state", gw_breaker_state_name(bs.state),
                                                    "trips", (json_int_t)bs.trips, "retry_after_ms",
                                                    bs.retry_after_ms));
    else
        json_object_set_new(o, "breaker", json_null());
    json_t *outcomes = json_object();
    uint64_t calls = 0;
    for (unsigned k = 0; k < GW_OUT_MAX; k++) {
        calls += m.outcome[k];
        if (m.outcome[k] || k == GW_OUT_OK)
            json_object_set_new(outcomes, gw_outcome_names[k], json_integer((json_int_t)m.outcome[k]));
    }
    json_object_set_new(o, "calls", json_integer((json_int_t)calls));
    json_object_set_new(o, "outcomes", outcomes);
    json_object_set_new(o, "retries", json_integer((json_int_t)m.retries));
    json_object_set_new(o, "hedges", json_integer((json_int_t)m.hedges));
    json_t *rec = recent(false, b->mid);
    /* health: the breaker's word first, then the recent error share */
    const char *health = "idle";
    json_t *ratio = json_is_object(rec) ? json_object_get(rec, "error_ratio") : NULL;
    if (has_breaker && bs.state == GW_BREAKER_OPEN)
        health = "down";
    else if (has_breaker && bs.state == GW_BREAKER_HALF_OPEN)
        health = "recovering";
    else if (ratio && json_is_real(ratio))
        health = json_real_value(ratio) >= 0.5 ? "failing" : json_real_value(ratio) > 0 ? "degraded" : "up";
    json_object_set_new(o, "health", json_string(health));
    json_object_set_new(o, "recent", rec);
    json_object_set_new(o, "balance", json_string(gw_cluster_balance_name((int)b->balance)));
    json_object_set_new(o, "servers", servers_json(b));
    return o;
}

static json_t *
status_json(void)
{
    gw_config_t *cfg = cfg_get();
    gw_m_process_t p;
    gw_metrics_process(&p);
    json_t *o = json_object();
    json_object_set_new(o, "version", json_string(PACKAGE_VERSION));
    json_object_set_new(o, "pid", json_integer(getpid()));
    json_object_set_new(o, "started", json_integer((json_int_t)adm.started));
    json_object_set_new(o, "uptime_seconds", json_real((double)(gw_now_ms() - adm.started_ms) / 1000.0));
    bool draining = __atomic_load_n(&adm.draining, __ATOMIC_RELAXED);
    json_object_set_new(o, "ready", json_boolean(!draining));
    json_object_set_new(o, "draining", json_boolean(draining));
    json_object_set_new(o, "workers", json_integer(adm.srv->nworkers));
    json_object_set_new(o, "connections", json_integer(__atomic_load_n(&adm.srv->conns, __ATOMIC_RELAXED)));
    json_object_set_new(o, "connections_accepted", json_integer((json_int_t)p.accepted));
    int64_t inflight = inflight_now();
    json_object_set_new(o, "requests_in_flight", json_integer((json_int_t)inflight));
    json_object_set_new(o, "requests_shed", json_integer((json_int_t)p.shed));
    json_object_set_new(o, "reloads", json_pack("{s:I, s:I, s:o, s:o}", "ok", (json_int_t)p.reloads_ok, "failed",
                                                (json_int_t)p.reloads_failed, "last",
                                                p.last_reload ? json_integer((json_int_t)p.last_reload) : json_null(),
                                                "last_ok", p.last_reload ? json_boolean(p.last_reload_ok) : json_null()));
    json_t *routes = json_array(), *backends = json_array();
    if (cfg) {
        json_object_set_new(o, "configuration", json_string(cfg->file));
        for (size_t i = 0; i < cfg->nroutes; i++)
            json_array_append_new(routes, route_json(cfg->routes[i]));
        for (size_t i = 0; i < cfg->nbackends; i++)
            json_array_append_new(backends, backend_json(cfg->backends[i]));
    }
    json_object_set_new(o, "routes", routes);
    json_object_set_new(o, "backends", backends);
    gw_config_unref(cfg);
    return o;
}

/* --- /metrics ------------------------------------------------------------- */

/* Descriptors open now (/proc/self/fd, without the one reading it); -1 when unreadable. */
static long
open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        return -1;
    long n = 0;
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n - 1;
}

/* The Prometheus client libraries' standard process_* metrics, so the usual
 * dashboards and alerts (open_fds / max_fds above 0.8, say) work as they are. */
static void
process_metrics(struct evbuffer *out)
{
    struct rusage ru;
    double cpu = 0;
    if (getrusage(RUSAGE_SELF, &ru) == 0)
        cpu = (double)(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
              (double)(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
    evbuffer_add_printf(out,
                        "# HELP process_cpu_seconds_total User and system CPU time spent, in seconds.\n"
                        "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total %.3f\n"
                        "# HELP process_start_time_seconds Start time of the process since the epoch, in seconds.\n"
                        "# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds %lld\n",
                        cpu, (long long)adm.started);
    long fds = open_fds();
    if (fds >= 0)
        evbuffer_add_printf(out,
                            "# HELP process_open_fds Number of open file descriptors.\n"
                            "# TYPE process_open_fds gauge\nprocess_open_fds %ld\n",
                            fds);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur != RLIM_INFINITY)
        evbuffer_add_printf(out,
                            "# HELP process_max_fds Maximum number of open file descriptors (soft RLIMIT_NOFILE).\n"
                            "# TYPE process_max_fds gauge\nprocess_max_fds %llu\n",
                            (unsigned long long)rl.rlim_cur);
    unsigned long long vm_pages, rss_pages;
    FILE *f = fopen("/proc/self/statm", "re");
    if (f) {
        if (fscanf(f, "%llu %llu", &vm_pages, &rss_pages) == 2) {
            unsigned long long page = (unsigned long long)sysconf(_SC_PAGESIZE);
            evbuffer_add_printf(out,
                                "# HELP process_virtual_memory_bytes Virtual memory size in bytes.\n"
                                "# TYPE process_virtual_memory_bytes gauge\nprocess_virtual_memory_bytes %llu\n"
                                "# HELP process_resident_memory_bytes Resident memory size in bytes.\n"
                                "# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes %llu\n",
                                vm_pages * page, rss_pages * page);
        }
        fclose(f);
    }
}

/* The process-wide memory budgets (gw_budget.h). */
static void
budget_metrics(struct evbuffer *out)
{
    static const struct {
        const char *name;
        const gw_budget_t *b;
    } budgets[] = { { "request_bodies", &gw_budget_bodies }, { "responses", &gw_budget_responses } };
    evbuffer_add_printf(out, "# HELP gatherd_memory_budget_bytes Bytes a memory budget allows and holds now.\n"
                             "# TYPE gatherd_memory_budget_bytes gauge\n");
    for (size_t i = 0; i < GW_NELEM(budgets); i++)
        evbuffer_add_printf(out,
                            "gatherd_memory_budget_bytes{budget=\"%s\",kind=\"used\"} %zu\n"
                            "gatherd_memory_budget_bytes{budget=\"%s\",kind=\"limit\"} %zu\n",
                            budgets[i].name, gw_budget_used(budgets[i].b), budgets[i].name,
                            gw_budget_limit(budgets[i].b));
    evbuffer_add_printf(out, "# HELP gatherd_memory_budget_refused_total Takes a memory budget refused (503).\n"
                             "# TYPE gatherd_memory_budget_refused_total counter\n");
    for (size_t i = 0; i < GW_NELEM(budgets); i++)
        evbuffer_add_printf(out, "gatherd_memory_budget_refused_total{budget=\"%s\"} %llu\n", budgets[i].name,
                            (unsigned long long)gw_budget_refused(budgets[i].b));
}

/* key="value" (escaped), and with a second pair when key2 is set, as a
 * new string (free); tmp is scratch space. */
static char *
label_of(struct evbuffer *tmp, const char *key, const char *value, const char *key2, const char *value2)
{
    evbuffer_drain(tmp, evbuffer_get_length(tmp));
    gw_metrics_label(tmp, key, value);
    if (key2) {
        evbuffer_add(tmp, ",", 1);
        gw_metrics_label(tmp, key2, value2);
    }
    size_t n = evbuffer_get_length(tmp);
    char *text = gw_malloc(n + 1);
    evbuffer_remove(tmp, text, n);
    text[n] = '\0';
    return text;
}

static void
family(struct evbuffer *out, const char *name, const char *type, const char *help)
{
    evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

/* The gatherd_upstream_server_* families: every server of every backend of
 * cfg, labelled backend and server (its label, "10.0.0.2:8080"). Each
 * server's shared state is read once (gw_cluster_stats), so its families
 * agree with each other within a scrape; connections are the workers'
 * gauges of its slot (gw_metrics.h), never read from a worker's pool. */
static void
server_metrics(struct evbuffer *out, const gw_config_t *cfg, struct evbuffer *tmp)
{
    size_t n = 0;
    for (size_t i = 0; i < cfg->nbackends; i++)
        n += cfg->backends[i]->nservers;
    typedef struct {
        const gw_backend_t *b;
        const gw_peer_t *s;
        char *labels;
        gw_hserver_stats_t st;
        gw_mserver_t conns;
    } row_t;
    row_t *rows = gw_calloc(n ? n : 1, sizeof(row_t));
    uint64_t now = gw_now_ms();
    size_t r = 0;
    for (size_t i = 0; i < cfg->nbackends; i++) {
        const gw_backend_t *b = cfg->backends[i];
        for (size_t k = 0; k < b->nservers; k++, r++) {
            rows[r].b = b;
            rows[r].s = &b->servers[k];
            rows[r].labels = label_of(tmp, "backend", b->name, "server", b->servers[k].label);
            gw_cluster_stats(rows[r].s, now, &rows[r].st);
            if (rows[r].s->mid != GW_M_SERVER_OTHER)
                gw_metrics_server_sum(rows[r].s->mid, &rows[r].conns);
        }
    }
    family(out, "gatherd_upstream_server_requests_total", "counter",
           "Tries sent to a backend server that came to an end, whatever their outcome (retries and hedges "
           "each count; a try cancelled before its answer does not).");
    for (r = 0; r < n; r++)
        evbuffer_add_printf(out, "gatherd_upstream_server_requests_total{%s} %llu\n", rows[r].labels,
                            (unsigned long long)rows[r].st.requests);
    family(out, "gatherd_upstream_server_failures_total", "counter",
           "Tries sent to a backend server that failed, by failure code.");
    for (r = 0; r < n; r++) {
        const char *names[GW_FAIL_MAX];
        uint64_t counts[GW_FAIL_MAX];
        size_t nf = failures_by_name(&rows[r].st, names, counts);
        for (size_t k = 0; k < nf; k++)
            evbuffer_add_printf(out, "gatherd_upstream_server_failures_total{%s,code=\"%s\"} %llu\n", rows[r].labels,
                                names[k], (unsigned long long)counts[k]);
    }
    family(out, "gatherd_upstream_server_in_flight", "gauge", "Tries in progress on a backend server, all workers.");
    for (r = 0; r < n; r++)
        evbuffer_add_printf(out, "gatherd_upstream_server_in_flight{%s} %d\n", rows[r].labels, rows[r].st.inflight);
    family(out, "gatherd_upstream_server_healthy", "gauge",
           "1 when the server passes its active health checks (always, without health_check), else 0.");
    for (r = 0; r < n; r++)
        evbuffer_add_printf(out, "gatherd_upstream_server_healthy{%s} %d\n", rows[r].labels, rows[r].st.healthy);
    family(out, "gatherd_upstream_server_ejected", "gauge", "1 while outlier detection keeps the server out, else 0.");
    for (r = 0; r < n; r++)
        evbuffer_add_printf(out, "gatherd_upstream_server_ejected{%s} %d\n", rows[r].labels, rows[r].st.ejected);
    family(out, "gatherd_upstream_server_ejections_total", "counter", "Times outlier detection ejected the server.");
    for (r = 0; r < n; r++)
        evbuffer_add_printf(out, "gatherd_upstream_server_ejections_total{%s} %llu\n", rows[r].labels,
                            (unsigned long long)rows[r].st.ejections);
    family(out, "gatherd_upstream_server_health_checks_total", "counter",
           "Active health checks of the server, by result (servers of backends with health_check).");
    for (r = 0; r < n; r++) {
        if (rows[r].b->health_check == NULL)
            continue;
        uint64_t fail = 0;
        for (unsigned k = GW_HC_OK + 1; k < GW_HC_MAX; k++)
            fail += rows[r].st.checks[k];
        evbuffer_add_printf(out,
                            "gatherd_upstream_server_health_checks_total{%s,result=\"ok\"} %llu\n"
                            "gatherd_upstream_server_health_checks_total{%s,result=\"fail\"} %llu\n",
                            rows[r].labels, (unsigned long long)rows[r].st.checks[GW_HC_OK], rows[r].labels,
                            (unsigned long long)fail);
    }
    family(out, "gatherd_upstream_server_weight", "gauge", "The server's configured weight.");
    for (r = 0; r < n; r++)
        evbuffer_add_printf(out, "gatherd_upstream_server_weight{%s} %u\n", rows[r].labels, rows[r].s->weight);
    family(out, "gatherd_upstream_server_backup", "gauge", "1 for a backup server, else 0.");
    for (r = 0; r < n; r++)
        evbuffer_add_printf(out, "gatherd_upstream_server_backup{%s} %d\n", rows[r].labels, rows[r].s->backup);
    family(out, "gatherd_upstream_server_connections", "gauge",
           "Connections to the server, all workers: open (connecting, in use or idle) and idle (pooled).");
    for (r = 0; r < n; r++)
        if (rows[r].s->mid != GW_M_SERVER_OTHER)
            evbuffer_add_printf(out,
                                "gatherd_upstream_server_connections{%s,state=\"open\"} %lld\n"
                                "gatherd_upstream_server_connections{%s,state=\"idle\"} %lld\n",
                                rows[r].labels, (long long)rows[r].conns.open, rows[r].labels,
                                (long long)rows[r].conns.idle);
    for (r = 0; r < n; r++)
        free(rows[r].labels);
    free(rows);
}

static void
metrics_text(struct evbuffer *out)
{
    gw_metrics_render(out);
    evbuffer_add_printf(out,
                        "# HELP gatherd_build_info Version of gatherd and of its libraries.\n"
                        "# TYPE gatherd_build_info gauge\n"
                        "gatherd_build_info{version=\"%s\",libevent=\"%s\",jansson=\"%s\",openssl=\"%s\"} 1\n",
                        PACKAGE_VERSION, event_get_version(), JANSSON_VERSION, OPENSSL_VERSION_STR);
    evbuffer_add_printf(out,
                        "# HELP gatherd_start_time_seconds When the process started (unix time).\n"
                        "# TYPE gatherd_start_time_seconds gauge\ngatherd_start_time_seconds %lld\n",
                        (long long)adm.started);
    int64_t inflight = inflight_now();
    evbuffer_add_printf(out,
                        "# HELP gatherd_requests_in_flight Requests being read or handled.\n"
                        "# TYPE gatherd_requests_in_flight gauge\ngatherd_requests_in_flight %lld\n"
                        "# HELP gatherd_connections Open client connections.\n"
                        "# TYPE gatherd_connections gauge\ngatherd_connections %u\n"
                        "# HELP gatherd_workers Worker threads.\n# TYPE gatherd_workers gauge\ngatherd_workers %d\n"
                        "# HELP gatherd_ready 1 when ready for traffic, 0 while draining.\n"
                        "# TYPE gatherd_ready gauge\ngatherd_ready %d\n",
                        (long long)inflight, __atomic_load_n(&adm.srv->conns, __ATOMIC_RELAXED), adm.srv->nworkers,
                        !__atomic_load_n(&adm.draining, __ATOMIC_RELAXED));
    process_metrics(out);
    budget_metrics(out);
    gw_config_t *cfg = cfg_get();
    gw_cache_metrics(out, cfg);
    if (cfg == NULL)
        return;
    struct evbuffer *lb = evbuffer_new();
    char **bl = gw_calloc(cfg->nbackends ? cfg->nbackends : 1, sizeof(char *));
    for (size_t i = 0; i < cfg->nbackends; i++)
        bl[i] = label_of(lb, "backend", cfg->backends[i]->name, NULL, NULL);
    evbuffer_add_printf(out, "# HELP gatherd_breaker_state Circuit breaker state: 0 closed, 1 open, 2 half-open.\n"
                             "# TYPE gatherd_breaker_state gauge\n");
    for (size_t i = 0; i < cfg->nbackends; i++) {
        gw_breaker_stats_t bs;
        if (gw_breaker_stats(cfg->backends[i], &bs))
            evbuffer_add_printf(out, "gatherd_breaker_state{%s} %d\n", bl[i], (int)bs.state);
    }
    evbuffer_add_printf(out, "# HELP gatherd_breaker_trips_total Times the circuit breaker opened.\n"
                             "# TYPE gatherd_breaker_trips_total counter\n");
    for (size_t i = 0; i < cfg->nbackends; i++) {
        gw_breaker_stats_t bs;
        if (gw_breaker_stats(cfg->backends[i], &bs))
            evbuffer_add_printf(out, "gatherd_breaker_trips_total{%s} %llu\n", bl[i], (unsigned long long)bs.trips);
    }
    evbuffer_add_printf(out, "# HELP gatherd_retry_budget_denied_total Retries and hedges the retry budget refused.\n"
                             "# TYPE gatherd_retry_budget_denied_total counter\n");
    for (size_t i = 0; i < cfg->nbackends; i++) {
        gw_retry_stats_t rs;
        if (!cfg->backends[i]->retry->enabled)
            continue;
        gw_retry_stats(cfg->backends[i]->retry, &rs);
        evbuffer_add_printf(out, "gatherd_retry_budget_denied_total{%s} %llu\n", bl[i], rs.denied);
    }
    server_metrics(out, cfg, lb);
    for (size_t i = 0; i < cfg->nbackends; i++)
        free(bl[i]);
    free(bl);
    evbuffer_free(lb);
    gw_config_unref(cfg);
}

/* --- HTTP ----------------------------------------------------------------- */

static void
reply(struct evhttp_request *req, int code, const char *reason, const char *type, struct evbuffer *body)
{
    struct evkeyvalq *h = evhttp_request_get_output_headers(req);
    evhttp_add_header(h, "Content-Type", type);
    evhttp_add_header(h, "Cache-Control", "no-store");
    evhttp_add_header(h, "Server", "gatherd");
    evhttp_send_reply(req, code, reason, body);
}

/* Whether the client asked for HTML: ?format=html, or a browser's Accept
 * (text/html) without ?format=json. */
static bool
wants_html(struct evhttp_request *req, const char *query)
{
    if (query && strstr(query, "format=json"))
        return false;
    if (query && strstr(query, "format=html"))
        return true;
    const char *accept = evhttp_find_header(evhttp_request_get_input_headers(req), "Accept");
    return accept && strstr(accept, "text/html");
}

static void
request_cb(struct evhttp_request *req, void *arg)
{
    GW_UNUSED(arg);
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
    const char *query = uri ? evhttp_uri_get_query(uri) : NULL;
    struct evbuffer *body = evbuffer_new();
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    if (path == NULL || body == NULL) {
        evhttp_send_error(req, 400, "Bad Request");
    } else if (cmd != EVHTTP_REQ_GET && cmd != EVHTTP_REQ_HEAD) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET, HEAD");
        evbuffer_add_printf(body, "method not allowed\n");
        reply(req, 405, "Method Not Allowed", "text/plain; charset=utf-8", body);
    } else if (strcmp(path, "/healthz") == 0) {
        evbuffer_add_printf(body, "ok\n");
        reply(req, 200, "OK", "text/plain; charset=utf-8", body);
    } else if (strcmp(path, "/readyz") == 0) {
        bool draining = __atomic_load_n(&adm.draining, __ATOMIC_RELAXED);
        evbuffer_add_printf(body, draining ? "draining\n" : "ready\n");
        reply(req, draining ? 503 : 200, draining ? "Service Unavailable" : "OK", "text/plain; charset=utf-8", body);
    } else if (strcmp(path, "/metrics") == 0) {
        metrics_text(body);
        reply(req, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", body);
    } else if (strcmp(path, "/status") == 0 && wants_html(req, query)) {
        evbuffer_add_reference(body, gw_admin_page, strlen(gw_admin_page), NULL, NULL);
        reply(req, 200, "OK", "text/html; charset=utf-8", body);
    } else if (strcmp(path, "/status") == 0) {
        json_t *s = status_json();
        char *text = json_dumps(s, JSON_INDENT(2) | JSON_REAL_PRECISION(6));
        json_decref(s);
        if (text) {
            evbuffer_add(body, text, strlen(text));
            evbuffer_add(body, "\n", 1);
            free(text);
        }
        reply(req, 200, "OK", "application/json", body);
    } else if (strcmp(path, "/") == 0) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Location", "/status");
        evbuffer_add_printf(body, "see /status, /metrics, /healthz, /readyz\n");
        reply(req, 302, "Found", "text/plain; charset=utf-8", body);
    } else {
        evbuffer_add_printf(body, "not found: try /status, /metrics, /healthz, /readyz\n");
        reply(req, 404, "Not Found", "text/plain; charset=utf-8", body);
    }
    if (body)
        evbuffer_free(body);
}

static void
stop_cb(evutil_socket_t fd, short what, void *arg)
{
    GW_UNUSED(what);
    GW_UNUSED(arg);
    uint64_t v;
    if (read(fd, &v, sizeof(v)) < 0) {
        /* the loop ends either way */
    }
    event_base_loopbreak(adm.base);
}

static void *
admin_main(void *arg)
{
    GW_UNUSED(arg);
    event_base_dispatch(adm.base);
    return NULL;
}

static void
admin_free(void)
{
    if (adm.http)
        evhttp_free(adm.http); /* closes its sockets and connections */
    if (adm.stop_ev)
        event_free(adm.stop_ev);
    if (adm.tick)
        event_free(adm.tick);
    if (adm.stop_fd >= 0)
        close(adm.stop_fd);
    if (adm.base)
        event_base_free(adm.base);
    free(adm.ring);
    adm.http = NULL;
    adm.stop_ev = adm.tick = NULL;
    adm.stop_fd = -1;
    adm.base = NULL;
    adm.ring = NULL;
}

int
gw_admin_start(const gw_config_t *cfg, gw_server_t *srv, char *err, size_t errlen)
{
    if (cfg->nadmin == 0)
        return GW_OK;
    adm.srv = srv;
    adm.started = time(NULL);
    adm.started_ms = gw_now_ms();
    adm.base = event_base_new();
    adm.http = adm.base ? evhttp_new(adm.base) : NULL;
    adm.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (adm.http == NULL || adm.stop_fd < 0) {
        snprintf(err, errlen, "admin listener: cannot create its event loop: %s", strerror(errno));
        admin_free();
        return GW_ERR;
    }
    /* every method reaches request_cb, which answers 405 (evhttp would say 501) */
    evhttp_set_allowed_methods(adm.http, 0xffff);
    evhttp_set_timeout(adm.http, 10);
    evhttp_set_max_headers_size(adm.http, 16 * 1024);
    evhttp_set_max_body_size(adm.http, 0);
    evhttp_set_gencb(adm.http, request_cb, NULL);
    for (size_t i = 0; i < cfg->nadmin; i++) {
        char why[512];
        evutil_socket_t fd = gw_server_open_socket(&cfg->admin_listen[i], false, true, why, sizeof(why));
        if (fd < 0 || evhttp_accept_socket_with_handle(adm.http, fd) == NULL) {
            snprintf(err, errlen, "admin listener: %s", fd < 0 ? why : "cannot watch its socket");
            if (fd >= 0)
                close(fd);
            admin_free();
            return GW_ERR;
        }
    }
    adm.ring = gw_calloc(RING, sizeof(ring_t));
    adm.ring_next = 0;
    adm.stop_ev = event_new(adm.base, adm.stop_fd, EV_READ, stop_cb, NULL);
    adm.tick = event_new(adm.base, -1, EV_PERSIST, tick_cb, NULL);
    struct timeval second = { 1, 0 };
    event_add(adm.stop_ev, NULL);
    event_add(adm.tick, &second);
    tick_cb(-1, 0, NULL);
    return GW_OK;
}

int
gw_admin_run(const gw_config_t *cfg, char *err, size_t errlen)
{
    if (adm.base == NULL)
        return GW_OK; /* no admin listener */
    int rc = pthread_create(&adm.thread, NULL, admin_main, NULL);
    if (rc != 0) {
        snprintf(err, errlen, "admin listener: cannot start its thread: %s", strerror(rc));
        admin_free();
        return GW_ERR;
    }
    adm.running = true;
    for (size_t i = 0; i < cfg->nadmin; i++)
        gw_log(GW_LOG_NOTICE, "admin listener on %s (/healthz /readyz /metrics /status)", cfg->admin_listen[i].text);
    return GW_OK;
}

void
gw_admin_stop(void)
{
    if (adm.running) {
        uint64_t one = 1;
        if (write(adm.stop_fd, &one, sizeof(one)) < 0)
            gw_log(GW_LOG_ERR, "cannot stop the admin thread: %s", strerror(errno));
        pthread_join(adm.thread, NULL);
        adm.running = false;
    }
    admin_free();
    pthread_mutex_lock(&adm.mtx);
    gw_config_t *cfg = adm.cfg;
    adm.cfg = NULL;
    pthread_mutex_unlock(&adm.mtx);
    gw_config_unref(cfg);
}
