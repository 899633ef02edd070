/*
 * gw_admin.h - the admin listener: /healthz, /readyz, /metrics, /status.
 *
 * One thread of its own with its own event_base and libevent's evhttp
 * server: the admin port is for probes, scrapers and people, a few
 * requests a second, so its HTTP handling is libevent's and not the
 * workers' hand-tuned path, and nothing it does can delay a request of a
 * worker. It reads the workers' counters (gw_metrics.h) without locks, and
 * the configuration the main thread published last (gw_admin_publish),
 * under a mutex only the main thread and this thread take.
 *
 * /readyz says 503 from the moment a graceful stop begins (gw_admin_drain)
 * until the process exits: a load balancer stops sending new requests
 * while the ones in flight finish.
 */
#ifndef GW_ADMIN_H
#define GW_ADMIN_H

#include "gw_core.h"

/* Binds cfg's admin addresses and starts the admin thread (nothing when
 * cfg has none). srv: the running server (borrowed until gw_admin_stop).
 * GW_ERR with the reason in err (nothing started). Main thread, once, after
 * the workers started. */
int gw_admin_start(const gw_config_t *cfg, gw_server_t *srv, char *err, size_t errlen);

/* The configuration /status and /metrics describe from now on (a
 * reference is taken; the previous one is dropped). Main thread. */
void gw_admin_publish(gw_config_t *cfg);

/* A graceful stop began: /readyz answers 503 from now on. */
void gw_admin_drain(void);

/* Stops the thread and frees everything. Main thread, before the server is
 * freed. A no-op when it was not started. */
void gw_admin_stop(void);

/* The status page (gw_admin_page.c): self-contained HTML. */
extern const char gw_admin_page[];

#endif
