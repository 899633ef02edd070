/*
 * gw_hcheck.h - active health checks of backend servers ("health_check").
 *
 * One checker per process, on a thread and event_base of its own (never a
 * worker's loop), with its own connections: every server of every backend
 * with a "health_check" gets a plain HTTP/1.1 request
 *     GET PATH HTTP/1.1, Host: the server's host_header, Connection: close,
 *     User-Agent: gatherd-health-check
 * (TLS for https backends, through the backend's SSL_CTX, with the server's
 * SNI and certificate name) every interval_ms, +-10% jitter per check, the
 * next one interval_ms after the previous one ended (as Envoy). A check
 * passes when the status line arrives within timeout_ms (connect included)
 * with one of "statuses"; only the status line is read (at most
 * GW_HCHECK_MAX_HEAD bytes), then the connection is closed. "healthy"
 * passes in a row make an unhealthy server healthy, "unhealthy" failures in
 * a row make a healthy one unhealthy (gw_cluster_checked); each change is
 * logged once (rate limited):
 *   [warn] backend users server 10.0.0.2:8080 is unhealthy: status 503 from health check (3 in a row)
 *   [notice] backend users server 10.0.0.2:8080 is healthy again (2 checks in a row passed)
 *
 * Servers start healthy (gw_cluster.h says why); the first check of a
 * server runs right after start (or after the reload that added it), within
 * a random tenth of its interval so that many servers do not start their
 * checks at the same instant.
 *
 * A server named by host name is checked at the first address of its
 * current answer (through gw_dns on the checker's loop, the configuration's
 * "resolver"), not at each of its addresses: the request path spreads
 * connections over the addresses and marks bad ones down by itself.
 *
 * Reload: gw_hcheck_reload() hands the new configuration to the thread and
 * returns at once. The thread abandons the checks in flight (their
 * connections are closed: nothing waits for them) and schedules the new
 * configuration's servers: a server that kept its gw_hserver_t
 * (gw_cluster_inherit) keeps its schedule, a new one is checked at once.
 * gw_hcheck_stop() likewise abandons what runs and joins the thread.
 */
#ifndef GW_HCHECK_H
#define GW_HCHECK_H

#include "gw_core.h"

/* The most bytes read of a check's answer while looking for the end of its
 * status line. */
#define GW_HCHECK_MAX_HEAD 16384

/*
 * Starts the checker thread on cfg (a reference is taken) when a backend
 * has a health check; else nothing runs (no thread, loop or descriptor)
 * until a reload adds one. Main thread, after privileges are dropped. Reads the resolver's files when a backend
 * has a host name. GW_ERR with the reason in err (nothing left running).
 */
int gw_hcheck_start(gw_config_t *cfg, char *err, size_t errlen);

/* From now on, checks follow cfg (a reference is taken; the thread drops
 * the previous one). Main thread; never blocks on the checker. When the
 * checker does not run (no backend had a health_check), it starts here if
 * cfg has one (a failure is logged: the reload itself stands). */
void gw_hcheck_reload(gw_config_t *cfg);

/* Stops the thread (checks in flight are abandoned), joins it and frees
 * everything. Main thread. A no-op when it was not started. */
void gw_hcheck_stop(void);

#endif
