/*
 * gw_conn.h - one client connection: reads requests with gw_parser, answers
 * them strictly in order (pipelined requests wait in the input buffer),
 * keeps the connection alive, enforces the timeouts, and closes it.
 *
 * Ownership: a connection belongs to the worker that accepted it and is
 * freed only by that worker's thread, and only at the end of the outermost
 * callback that decided it must go (never inside a chain that may still
 * touch it). The request being handled is embedded in the connection.
 */
#ifndef GW_CONN_H
#define GW_CONN_H

#include "gw_core.h"

#include <event2/util.h>
#include <sys/socket.h>

/* Takes over fd, a freshly accepted socket of worker w. */
void gw_conn_accept(gw_worker_t *w, evutil_socket_t fd, const struct sockaddr *sa, int salen);

/* Graceful stop: closes the connection now when idle, else after its
 * current response. */
void gw_conn_shutdown(gw_conn_t *c);

/* Marks the connection closed, whatever it was doing; it is freed by the
 * next gw_conn_release(). */
void gw_conn_close(gw_conn_t *c);

/* Frees c if it was marked closed. Only at the end of an entry point (a
 * callback or the worker's stop), where nothing up the stack uses c. */
void gw_conn_release(gw_conn_t *c);

/* The next connection in the worker's list. */
gw_conn_t *gw_conn_next(gw_conn_t *c);

#endif
