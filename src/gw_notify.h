/*
 * gw_notify.h - the service manager's readiness protocol (sd_notify), spoken
 * without libsystemd: one datagram per state change, sent to the AF_UNIX
 * socket named by $NOTIFY_SOCKET (a path, or "@name" for an abstract one).
 *
 * Main thread only. gw_main.c says READY=1 once the listeners are bound and
 * the workers run, RELOADING=1 (with MONOTONIC_USEC, systemd >= 253) when a
 * SIGHUP reload begins and READY=1 when it ends, whatever its outcome, and
 * STOPPING=1 when a stop begins. Without $NOTIFY_SOCKET every call is a
 * no-op, so the daemon behaves the same outside systemd.
 */
#ifndef GW_NOTIFY_H
#define GW_NOTIFY_H

#include "gw_core.h"

/*
 * Reads $NOTIFY_SOCKET and opens the datagram socket. GW_OK when there is
 * none (nothing will be sent) or it is usable; GW_ERR with a log line when
 * it is set but malformed or the socket cannot be made: notifications are
 * then off, the daemon runs on (systemd will time out the start and say so).
 */
int gw_notify_init(void);

/*
 * Sends msg ("READY=1", several "KEY=VALUE" lines joined by "\n") as one
 * datagram, without blocking. GW_OK when sent or when notifications are
 * off; GW_ERR with a log line when sending failed. msg is borrowed.
 */
int gw_notify_send(const char *msg);

/* "READY=1\nMAINPID=<pid>": start-up is complete. */
int gw_notify_ready(void);
/* "RELOADING=1\nMONOTONIC_USEC=<CLOCK_MONOTONIC in us>": a reload begins. */
int gw_notify_reloading(void);
/* "READY=1": a reload ended (applied or refused). */
int gw_notify_reloaded(void);
/* "STOPPING=1": a stop begins. */
int gw_notify_stopping(void);

/* Closes the socket (at exit). */
void gw_notify_close(void);

#endif
