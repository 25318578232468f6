/* backprop's own team of threads for the kernels' parallel loops.
 *
 * The loops are written with Cython's prange; GCC outlines each parallel region into a
 * function and calls the OpenMP runtime's entry point GOMP_parallel(body, data, n).
 * This file defines that entry point (and the three calls a region's body makes:
 * omp_get_thread_num, omp_get_num_threads, GOMP_barrier), hidden inside the compiled
 * core, so that backprop's regions run on the team below while every other library's
 * OpenMP keeps its own runtime.  tests/test_team.py checks that the core asks libgomp
 * for nothing else.
 *
 * Why not libgomp's team: a libgomp region ends when every thread of the team has
 * arrived, so a thread the OS has descheduled (another process is busy, NumPy's
 * OpenBLAS threads are spinning after a call) holds the whole region for a scheduler
 * time slice, and its waits spin or sleep by a policy read once, at load.  Here:
 *
 *  - The n "threads" a region asks for are n parts, claimed one at a time by whichever
 *    thread comes first: the caller starts at once, a helper joins when it wakes.  A
 *    part computes exactly what thread number `part` of an n-thread OpenMP team would
 *    (omp_get_thread_num() returns the part), so results do not depend on who runs it:
 *    every kernel already gives the same bits for any team.  The region ends when all
 *    parts are done; a helper that never claimed one is not waited for.
 *  - Idle helpers spin for a short while (back-to-back regions of one step find them
 *    awake), then sleep on a futex.  The spin is set at run time, not at load.
 *  - GOMP_barrier is a real barrier that never waits for a part nobody runs: a part
 *    that reaches it first claims and runs the parts not yet started (each up to its
 *    own barrier and on), then waits only for parts other threads are running.  Cython's
 *    prange has one barrier per part at most (where a loop variable is both firstprivate
 *    and lastprivate, every part's copy-in must come before any part's copy-out).
 *  - One region at a time uses the helpers: a region started while another runs (a
 *    second Python thread, or a region inside a part) runs its parts one after another
 *    on its caller, which gives the same result.
 *
 * Only for GCC on Linux (the GOMP entry points and futexes); elsewhere the regions run
 * on the compiler's OpenMP runtime, as before.
 */
#ifndef BP_TEAM_H
#define BP_TEAM_H

#if defined(_OPENMP) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)
#define BP_OWN_TEAM 1

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define bp_relax() _mm_pause()
#else
#define bp_relax() __asm__ __volatile__("" ::: "memory")
#endif

#define BP_HIDDEN __attribute__((visibility("hidden")))

/* A seam for tests/test_team.py, which compiles this file into a program that pauses
 * here to widen the windows between a region's steps; nothing in the core. */
#ifndef BP_TEAM_PAUSE
#define BP_TEAM_PAUSE(where)
#endif

/* At most this many helpers: the core's MAX_THREADS (1024) less the caller. */
#define BP_TEAM_MAX_HELPERS 1023

typedef void (*bp_region_body)(void*);

/* A region: its body, data and number of parts, and the counts its threads share.  The
 * team's regions use one shared instance, reused; a region run alone uses its own. */
typedef struct {
    /* Valid while parts are unclaimed.  Helpers read them between loading `ticket` and
     * claiming a part; a claim succeeds only if `ticket` has not moved, and the caller
     * moves it (closes it) before it rewrites them, so a stale read is never run. */
    bp_region_body body;
    void* data;
    int parts;
    /* (region number << 32) | next unclaimed part: a claim is one compare-and-swap. */
    uint64_t ticket;
    int unfinished;             /* futex word: parts not yet done; the caller waits for 0 */
    int caller_asleep;
    int arrived;                /* parts that have reached their barrier */
} bp_region;

static struct {
    pthread_mutex_t lock;       /* held by the region that uses the helpers */
    int helpers;                /* helper threads started (they never exit) */
    bp_region shared;           /* the region the helpers work on */
    int region;                 /* futex word idle helpers sleep on: the region number */
    int sleepers;               /* helpers asleep on `region` (woken only if any) */
    long spin_ns;               /* how long an idle thread spins before it sleeps */
    long long busy_until;       /* ns: until then another process wants our CPUs */
    int cpus;                   /* CPUs the process may use, when helpers started */
} bp_team = {PTHREAD_MUTEX_INITIALIZER, 0, {NULL, NULL, 0, 0, 0, 0, 0}, 0, 0, -1, 0, 1};
static int bp_team_most = BP_TEAM_MAX_HELPERS;      /* lowered when a start fails */

/* The part this thread is running, its region's number of parts (1 outside one), and
 * the region with its number (for the barrier's claims). */
static __thread int bp_part = 0;
static __thread int bp_parts = 1;
static __thread bp_region* bp_current = NULL;
static __thread uint32_t bp_current_number = 0;

static inline long bp_futex(int* word, int op, int value) {
    return syscall(SYS_futex, word, op | FUTEX_PRIVATE_FLAG, value, NULL, NULL, 0);
}

static inline long long bp_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Spin until *word != value or the spin budget is spent; 1 if it changed. */
static inline int bp_spin_while(int* word, int value, long budget_ns) {
    long long until;
    int i;
    if (__atomic_load_n(word, __ATOMIC_ACQUIRE) != value)
        return 1;
    if (budget_ns <= 0)
        return 0;
    until = bp_now_ns() + budget_ns;
    for (;;) {
        for (i = 0; i < 64; i++) {
            if (__atomic_load_n(word, __ATOMIC_ACQUIRE) != value)
                return 1;
            bp_relax();
        }
        if (bp_now_ns() >= until)
            return 0;
    }
}

/* Whether other processes compete for the CPUs: the kernel's count of runnable threads
 * (/proc/loadavg's fourth field, read by a region's caller every 10 ms at most: one
 * pread of a small file), less our own, plus the team we would like to run, exceeds
 * the CPUs twice in a row.  It is read only while no helper sleeps, when all of ours
 * are runnable (a helper being woken is runnable but not yet awake: counting it would
 * be guesswork).  Then, for the next 100 ms, idle threads sleep at once instead of
 * spinning: a spinning helper would take CPU time from its own caller and from the
 * process beside, and the parts it would have run are claimed by whoever is awake.
 * On an idle machine nothing changes.  (Counting one's own preemptions instead would
 * not do: a woken helper preempting its caller is one.) */
#define BP_LOOK_EVERY_NS 10000000LL
#define BP_BUSY_FOR_NS 100000000LL

static inline void bp_look_for_competition(int team) {
    static int loadavg = -2;            /* its descriptor: -2 not opened yet, -1 none */
    static long long looked_at = 0;
    static int crowded = 0;             /* looks in a row that found the CPUs taken */
    char text[128], *slash;
    long running;
    ssize_t got;
    long long now = bp_now_ns();
    if (now - looked_at < BP_LOOK_EVERY_NS ||
            __atomic_load_n(&bp_team.sleepers, __ATOMIC_RELAXED) > 0)
        return;
    looked_at = now;
    if (loadavg == -2)
        loadavg = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
    if (loadavg < 0 || (got = pread(loadavg, text, sizeof text - 1, 0)) <= 0)
        return;
    text[got] = 0;
    slash = strchr(text, '/');          /* "0.52 0.58 0.59 3/150 4321": 3 runnable */
    if (slash == NULL)
        return;
    while (slash > text && slash[-1] >= '0' && slash[-1] <= '9')
        slash--;
    running = strtol(slash, NULL, 10) - 1 - bp_team.helpers;         /* less ours */
    if (running + team <= bp_team.cpus)
        crowded = 0;
    else if (++crowded >= 2)        /* twice in a row: not a helper caught waking up */
        __atomic_store_n(&bp_team.busy_until, now + BP_BUSY_FOR_NS, __ATOMIC_RELAXED);
}

/* How long to spin: about 0.2 ms when the machine is ours and the team fits its CPUs;
 * not at all when another process competes, when the team is larger than the CPUs (a
 * spinning helper would take the CPU its caller needs), or when the user asked OpenMP
 * to wait passively. */
static inline long bp_spin_budget(void) {
    long spin = __atomic_load_n(&bp_team.spin_ns, __ATOMIC_RELAXED);
    if (spin < 0) {
        const char* policy = getenv("OMP_WAIT_POLICY");
        spin = (policy != NULL && strcasecmp(policy, "passive") == 0) ? 0 : 200000;
        __atomic_store_n(&bp_team.spin_ns, spin, __ATOMIC_RELAXED);
    }
    if (__atomic_load_n(&bp_team.shared.parts, __ATOMIC_RELAXED) >
            __atomic_load_n(&bp_team.cpus, __ATOMIC_RELAXED))
        return 0;
    if (spin > 0 && bp_now_ns() < __atomic_load_n(&bp_team.busy_until, __ATOMIC_RELAXED))
        return 0;
    return spin;
}

/* Run `part` of region r (number `number`) on this thread, then count it done. */
static inline void bp_run_part(bp_region* r, uint32_t number, bp_region_body body,
                               void* data, int part, int parts) {
    int saved_part = bp_part, saved_parts = bp_parts;
    bp_region* saved_region = bp_current;
    uint32_t saved_number = bp_current_number;
    bp_part = part;
    bp_parts = parts;
    bp_current = r;
    bp_current_number = number;
    body(data);
    bp_part = saved_part;
    bp_parts = saved_parts;
    bp_current = saved_region;
    bp_current_number = saved_number;
    if (__atomic_sub_fetch(&r->unfinished, 1, __ATOMIC_SEQ_CST) == 0 &&
            __atomic_load_n(&r->caller_asleep, __ATOMIC_SEQ_CST))
        bp_futex(&r->unfinished, FUTEX_WAKE, 1);
}

/* Claim one part of region r, number `number`, and run it: 0 if none is left. */
static inline int bp_claim_one(bp_region* r, uint32_t number) {
    for (;;) {
        uint64_t ticket = __atomic_load_n(&r->ticket, __ATOMIC_ACQUIRE);
        bp_region_body body;
        void* data;
        int parts;
        uint32_t part = (uint32_t)ticket;
        if ((uint32_t)(ticket >> 32) != number)
            return 0;
        BP_TEAM_PAUSE(after_ticket);
        body = __atomic_load_n(&r->body, __ATOMIC_RELAXED);
        data = __atomic_load_n(&r->data, __ATOMIC_RELAXED);
        parts = __atomic_load_n(&r->parts, __ATOMIC_RELAXED);
        if (part >= (uint32_t)parts)
            return 0;
        /* Pairs with the caller's fence after closing the ticket: if any value just read
         * belongs to a later region, the ticket has moved and the claim below fails. */
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_compare_exchange_n(&r->ticket, &ticket, ticket + 1, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            bp_run_part(r, number, body, data, (int)part, parts);
            return 1;
        }
    }
}

static void* bp_helper_main(void* unused) {
    int seen = __atomic_load_n(&bp_team.region, __ATOMIC_ACQUIRE);
    (void)unused;
    for (;;) {
        if (!bp_spin_while(&bp_team.region, seen, bp_spin_budget())) {
            __atomic_add_fetch(&bp_team.sleepers, 1, __ATOMIC_SEQ_CST);
            while (__atomic_load_n(&bp_team.region, __ATOMIC_SEQ_CST) == seen)
                bp_futex(&bp_team.region, FUTEX_WAIT, seen);
            __atomic_sub_fetch(&bp_team.sleepers, 1, __ATOMIC_ACQ_REL);
        }
        seen = __atomic_load_n(&bp_team.region, __ATOMIC_ACQUIRE);
        while (bp_claim_one(&bp_team.shared, (uint32_t)seen)) {}
    }
    return NULL;
}

/* A forked child has the caller's thread only: it starts helpers of its own. */
static void bp_team_after_fork(void) {
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    bp_team.lock = fresh;
    bp_team.helpers = 0;
    bp_team_most = BP_TEAM_MAX_HELPERS;
    bp_team.sleepers = 0;
    bp_team.shared.unfinished = 0;
    bp_team.shared.caller_asleep = 0;
}

/* Start helpers until there are `wanted` (as many as the OS gives: a failed start only
 * leaves the team smaller, and is not retried at every region).  Called with the lock
 * held. */
static void bp_team_grow(int wanted) {
    static int registered = 0;
    pthread_attr_t attr;
    if (wanted > bp_team_most)
        wanted = bp_team_most;
    if (bp_team.helpers >= wanted)
        return;
    if (!registered) {
        pthread_atfork(NULL, NULL, bp_team_after_fork);
        registered = 1;
    }
    {
        cpu_set_t allowed;      /* the CPUs this process may run on (taskset, cgroups) */
        long cpus = sched_getaffinity(0, sizeof allowed, &allowed) == 0
                    ? CPU_COUNT(&allowed) : sysconf(_SC_NPROCESSORS_ONLN);
        __atomic_store_n(&bp_team.cpus, cpus > 0 ? (int)cpus : 1, __ATOMIC_RELAXED);
    }
    if (pthread_attr_init(&attr) != 0)
        return;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    while (bp_team.helpers < wanted) {
        pthread_t thread;
        if (pthread_create(&thread, &attr, bp_helper_main, NULL) != 0) {
            bp_team_most = bp_team.helpers;
            break;
        }
        __atomic_add_fetch(&bp_team.helpers, 1, __ATOMIC_RELAXED);
    }
    pthread_attr_destroy(&attr);
}

BP_HIDDEN void GOMP_parallel(bp_region_body body, void* data, unsigned requested,
                             unsigned flags) {
    int parts = requested > 0 ? (int)requested : 1;
    uint32_t number;
    bp_region* r = &bp_team.shared;
    (void)flags;
    if (parts > BP_TEAM_MAX_HELPERS + 1)
        parts = BP_TEAM_MAX_HELPERS + 1;
    if (parts == 1 || bp_current != NULL || pthread_mutex_trylock(&bp_team.lock) != 0) {
        /* Alone: the same parts, claimed in order by this thread (region number 0). */
        bp_region alone = {body, data, parts, 0, parts, 0, 0};
        while (bp_claim_one(&alone, 0)) {}
        return;
    }
    bp_team_grow(parts - 1);
    bp_look_for_competition(parts);
    /* (Counted in unsigned arithmetic: it wraps after 2^32 regions.) */
    number = (uint32_t)__atomic_load_n(&bp_team.region, __ATOMIC_RELAXED) + 1u;
    /* Close the previous region's ticket before its description is rewritten: a helper
     * that read that ticket, was descheduled, and then reads this region's body, data
     * or (larger) part count must fail its claim, not run part `parts` of the previous
     * region with this region's description (a part run twice, the count of unfinished
     * parts driven below zero). */
    __atomic_store_n(&r->ticket, ((uint64_t)(number - 1u) << 32) | UINT32_MAX,
                     __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store_n(&r->body, body, __ATOMIC_RELAXED);
    __atomic_store_n(&r->data, data, __ATOMIC_RELAXED);
    __atomic_store_n(&r->parts, parts, __ATOMIC_RELAXED);
    __atomic_store_n(&r->unfinished, parts, __ATOMIC_RELAXED);
    __atomic_store_n(&r->arrived, 0, __ATOMIC_RELAXED);
    BP_TEAM_PAUSE(before_open);
    __atomic_store_n(&r->ticket, (uint64_t)number << 32, __ATOMIC_RELEASE);
    __atomic_store_n(&bp_team.region, (int)number, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&bp_team.sleepers, __ATOMIC_SEQ_CST) > 0)
        bp_futex(&bp_team.region, FUTEX_WAKE, parts - 1);
    while (bp_claim_one(r, number)) {}
    /* Every part is claimed; wait for the helpers still running one. */
    for (;;) {
        int left = __atomic_load_n(&r->unfinished, __ATOMIC_ACQUIRE);
        if (left == 0)
            break;
        if (bp_spin_while(&r->unfinished, left, bp_spin_budget()))
            continue;
        __atomic_store_n(&r->caller_asleep, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&r->unfinished, __ATOMIC_SEQ_CST) == left)
            bp_futex(&r->unfinished, FUTEX_WAIT, left);
        __atomic_store_n(&r->caller_asleep, 0, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&bp_team.lock);
}

/* Every part of the region reaches its barrier before any goes past it.  A part waiting
 * here gives idle helpers a moment (20 us; none while the machine is busy and they
 * sleep) to claim the parts nobody has started, then claims and runs those itself (each
 * up to its own barrier, then on to its end, on this thread's stack); so a barrier never
 * waits long for a part that is not running.  (Cython's prange has one barrier per part
 * at most: where a variable is both firstprivate and lastprivate, every part's copy-in
 * comes before any copy-out.) */
#define BP_BARRIER_PATIENCE_NS 20000LL

BP_HIDDEN void GOMP_barrier(void) {
    bp_region* r = bp_current;
    uint32_t number = bp_current_number;
    int parts = bp_parts, waits = 0;
    long long claim_after;
    if (r == NULL || parts <= 1)
        return;
    __atomic_add_fetch(&r->arrived, 1, __ATOMIC_SEQ_CST);
    claim_after = r == &bp_team.shared && bp_spin_budget() > 0
                  ? bp_now_ns() + BP_BARRIER_PATIENCE_NS : 0;
    while (__atomic_load_n(&r->arrived, __ATOMIC_ACQUIRE) < parts) {
        if ((claim_after == 0 || ((waits & 63) == 0 && bp_now_ns() >= claim_after)) &&
                bp_claim_one(r, number))
            continue;
        if (++waits < 100000)
            bp_relax();
        else
            sched_yield();      /* the part it waits for was started by a thread not running */
    }
}

BP_HIDDEN int omp_get_thread_num(void) { return bp_part; }

BP_HIDDEN int omp_get_num_threads(void) { return bp_parts; }

/* For the core's Python side: the helpers started, and the spin (ns; -1: the default). */
static inline int bp_team_helpers(void) {
    return __atomic_load_n(&bp_team.helpers, __ATOMIC_RELAXED);
}
static inline void bp_team_set_spin(long ns) {
    __atomic_store_n(&bp_team.spin_ns, ns, __ATOMIC_RELAXED);
}
static inline long bp_team_spin(void) { return bp_spin_budget(); }

#else
#define BP_OWN_TEAM 0
static inline int bp_team_helpers(void) { return 0; }
static inline void bp_team_set_spin(long ns) { (void)ns; }
static inline long bp_team_spin(void) { return -1; }
#endif

#endif
