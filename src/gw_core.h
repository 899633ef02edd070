/*
 * gw_core.h - what every gatherd file shares: return codes, forward
 * declarations of the main types (so headers never include each other in
 * circles) and the allocation policy.
 *
 * Memory policy: gw_malloc() and friends abort the process on out-of-memory
 * (as Redis and h2o do). Error paths are kept for failures that really
 * happen: network, input, limits.
 */
#ifndef GW_CORE_H
#define GW_CORE_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>
#include <stdbool.h>

#define GW_OK 0
#define GW_ERR (-1)
#define GW_AGAIN (-2)

#define GW_UNUSED(x) (void)(x)
#define GW_MIN(a, b) ((a) < (b) ? (a) : (b))
#define GW_MAX(a, b) ((a) > (b) ? (a) : (b))
#define GW_NELEM(a) (sizeof(a) / sizeof((a)[0]))

/* The monotonic clock, for durations and deadlines that need precision
 * (Server-Timing, breaker windows, queue and retry timing, rate buckets).
 * Not libevent's cached time: that is CLOCK_MONOTONIC_COARSE, in steps of a
 * few milliseconds. */
static inline uint64_t
gw_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
static inline uint64_t
gw_now_us(void)
{
    return gw_now_ns() / 1000u;
}
static inline uint64_t
gw_now_ms(void)
{
    return gw_now_ns() / 1000000u;
}

typedef struct gw_config_s gw_config_t;
typedef struct gw_route_s gw_route_t;
typedef struct gw_call_s gw_call_t;
typedef struct gw_backend_s gw_backend_t;
typedef struct gw_upstream_s gw_upstream_t;
typedef struct gw_pool_s gw_pool_t;
typedef struct gw_breaker_s gw_breaker_t;
typedef struct gw_breaker_conf_s gw_breaker_conf_t;
typedef struct gw_gen_s gw_gen_t;
typedef struct gw_dns_s gw_dns_t;
typedef struct gw_dns_name_s gw_dns_name_t;
typedef struct gw_proxy_s gw_proxy_t;
typedef struct gw_router_s gw_router_t;
typedef struct gw_match_s gw_match_t;
typedef struct gw_req_s gw_req_t;
typedef struct gw_parser_s gw_parser_t;
typedef struct gw_conn_s gw_conn_t;
typedef struct gw_worker_s gw_worker_t;
typedef struct gw_server_s gw_server_t;
/* One server of a backend ("servers"), its shared health and ejection
 * state, the backend's balancer and its "health_check" settings
 * (gw_config.h, gw_cluster.h). gw_server_t is the process (gw_server.h), so
 * a backend's server is a peer, as nginx calls it. */
typedef struct gw_peer_s gw_peer_t;
typedef struct gw_hserver_s gw_hserver_t;
typedef struct gw_cluster_s gw_cluster_t;
typedef struct gw_hc_conf_s gw_hc_conf_t;
typedef struct gw_jpath_s gw_jpath_t;
typedef struct gw_jpath_sel_s gw_jpath_sel_t;
typedef struct gw_tpl_s gw_tpl_t;
typedef struct gw_tpl_json_s gw_tpl_json_t;
typedef struct gw_cond_s gw_cond_t;
typedef struct gw_batch_s gw_batch_t;
typedef struct gw_batch_plan_s gw_batch_plan_t;

/* Allocation wrappers: never return NULL (abort with a log line instead). */
void *gw_malloc(size_t n);
void *gw_calloc(size_t count, size_t n);
void *gw_realloc(void *p, size_t n);
char *gw_strdup(const char *s);
char *gw_strndup(const char *s, size_t n);
/* Makes libevent, jansson and OpenSSL allocate through the wrappers above
 * (abort on out-of-memory). First thing in main(), before any of them runs. */
void gw_alloc_init(void);
/* Grows *arr (of elements of size elem) so it can hold need elements. */
void gw_grow(void **arr, size_t *cap, size_t need, size_t elem);

#endif
