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

/* Binds cfg's admin addresses and prepares the admin loop (nothing when
 * cfg has none); gw_admin_run starts its thread, after privileges are
 * dropped. srv: the server (borrowed until gw_admin_stop). GW_ERR with the
 * reason in err (nothing left). Main thread, once. */
int gw_admin_start(const gw_config_t *cfg, gw_server_t *srv, char *err, size_t errlen);
/* Starts the admin thread; GW_OK when there is no admin listener. GW_ERR
 * with the reason in err (gw_admin_stop frees the rest). Main thread, once. */
int gw_admin_run(const gw_config_t *cfg, char *err, size_t errlen);

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
