/* fake_nvml.c: a stand-in libnvidia-ml.so.1 for gpugate's tests.
 *
 * Built by the test session with
 *     gcc -shared -fPIC -O2 -o libnvidia-ml.so.1 fake_nvml.c -lpthread [-DNO_...]
 * and loaded through GPUGATE_NVML_LIBRARY, so the real sampling code (the
 * Cython twin's dlopen/dlsym path and nvidia-ml-py's ctypes path) runs against
 * it. Only the calls gpugate makes are exported; no NVIDIA header is used.
 *
 * State: the text file named by $FAKE_NVML_STATE, read again on every call
 * (unless FAKE_NVML_STATIC=1, for benchmarks: read once), so a test changes
 * the "hardware" by rewriting the file. One directive per line, fields as
 * key=value, '#' starts a comment:
 *
 *   driver 550.54.15          nvmlSystemGetDriverVersion (driver_rc=N fails it)
 *   init_rc N                 what nvmlInit* returns (9 driver not loaded, 18 ...)
 *   count_rc N                what nvmlDeviceGetCount_v2 returns
 *   entry_bytes 24|32         process entry size written by the _v2/_v3 calls
 *   block_memory 1            memory v2 calls wait (outside the lock, up to 5 s)
 *                             until the file no longer says so; else TIMEOUT
 *   device uuid= name= total= reserved= used= util_gpu= util_mem=
 *          mig=0|1 max_mig= lost=1 handle_rc= uuid_rc= memory_rc=
 *          memory_v1_rc= util_rc= proc_rc=
 *   mig slot=J uuid= name= total= reserved= used= lost= memory_rc= ...
 *                             a MIG instance of the last device line
 *   proc pid= used= gi= ci=   a compute process of the last device/mig line
 *                             (used=na: NVML_VALUE_NOT_AVAILABLE)
 *
 * Memory: v2 reports {total, reserved, free = total-reserved-used, used};
 * v1 reports used+reserved as used, as drivers >= R510 do. A *_rc field makes
 * that call return the code instead; lost=1 makes every call on the device
 * return GPU_IS_LOST. Without mig=..., nvmlDeviceGetMigMode is NOT_SUPPORTED.
 * Utilisation is NOT_SUPPORTED on MIG instances and MIG-enabled GPUs.
 *
 * Old drivers: -DNO_MEMORY_V2, -DNO_PROCS_V3, -DNO_PROCS_V2, -DNO_UTILIZATION,
 * -DNO_MIG, -DNO_INIT_WITH_FLAGS leave those symbols out; -DCONF_COMPUTE and
 * -DPROCESS_DETAIL_LIST add the symbols nvitop's layout heuristic looks at.
 *
 * Like NVML: calls before nvmlInit (or in a forked child before it inits
 * again) answer UNINITIALIZED; init and shutdown are reference-counted.
 * fakeNvmlCalls("name") returns how often a call was made in this process.
 */

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_DEV 16
#define MAX_MIG 8
#define MAX_PROCS 65536

enum {
    SUCCESS = 0, UNINITIALIZED = 1, INVALID_ARGUMENT = 2, NOT_SUPPORTED = 3,
    NOT_FOUND = 6, INSUFFICIENT_SIZE = 7, DRIVER_NOT_LOADED = 9, TIMEOUT = 10,
    GPU_IS_LOST = 15, ARGUMENT_VERSION_MISMATCH = 25, UNKNOWN = 999
};

#define MEMORY_V2_VERSION (40u | (2u << 24))
#define VALUE_NOT_AVAILABLE 0xFFFFFFFFFFFFFFFFull

typedef struct { unsigned pid; unsigned long long used; unsigned gi, ci; } fproc;

typedef struct fdev {
    int present, is_mig, parent, slot;
    char uuid[96], name[96];
    unsigned long long total, reserved, used;
    unsigned util_gpu, util_mem;
    int lost, handle_rc, uuid_rc, memory_rc, memory_v1_rc, util_rc, proc_rc;
    int mig_mode; /* -1: not supported */
    unsigned max_mig;
    int nproc, proc_start;
} fdev;

static fdev g_dev[MAX_DEV];
static fdev g_mig[MAX_DEV][MAX_MIG];
static fproc g_procs[MAX_PROCS];
static int g_nprocs, g_count, g_loaded;
static char g_driver[80];
static int g_init_rc, g_count_rc, g_driver_rc, g_entry_bytes, g_block_memory;
static pid_t g_init_pid;
static int g_refcount;
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;

static const char *CALL_NAMES[] = {
    "nvmlInit_v2", "nvmlInitWithFlags", "nvmlShutdown", "nvmlSystemGetDriverVersion",
    "nvmlDeviceGetCount_v2", "nvmlDeviceGetHandleByIndex_v2", "nvmlDeviceGetUUID",
    "nvmlDeviceGetName", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetMemoryInfo_v2",
    "nvmlDeviceGetUtilizationRates", "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetComputeRunningProcesses_v2", "nvmlDeviceGetComputeRunningProcesses_v3",
    "nvmlDeviceGetMigMode", "nvmlDeviceGetMaxMigDeviceCount",
    "nvmlDeviceGetMigDeviceHandleByIndex", NULL
};
static unsigned long g_calls[32];

static void lock_mu(void) { pthread_mutex_lock(&g_mu); }
static void unlock_mu(void) { pthread_mutex_unlock(&g_mu); }

__attribute__((constructor)) static void fake_setup(void) {
    /* A fork while another thread holds the lock must not leave it held. */
    pthread_atfork(lock_mu, unlock_mu, unlock_mu);
}

static void count_call(const char *name) {
    for (int i = 0; CALL_NAMES[i]; i++) {
        if (strcmp(CALL_NAMES[i], name) == 0) { g_calls[i]++; return; }
    }
}

unsigned long fakeNvmlCalls(const char *name) {
    unsigned long n = 0;
    lock_mu();
    for (int i = 0; CALL_NAMES[i]; i++) {
        if (strcmp(CALL_NAMES[i], name) == 0) n = g_calls[i];
    }
    unlock_mu();
    return n;
}

void fakeNvmlResetCalls(void) {
    lock_mu();
    memset(g_calls, 0, sizeof g_calls);
    unlock_mu();
}

/* -- the state file ---------------------------------------------------------- */

static void reset_dev(fdev *d) {
    memset(d, 0, sizeof *d);
    d->mig_mode = -1;
    d->max_mig = 7;
    d->util_gpu = 0;
}

static unsigned long long parse_u64(const char *v) {
    if (strcmp(v, "na") == 0) return VALUE_NOT_AVAILABLE;
    return strtoull(v, NULL, 10);
}

static void set_field(fdev *d, fproc *p, const char *key, const char *v) {
    if (p) {
        if (!strcmp(key, "pid")) p->pid = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(key, "used")) p->used = parse_u64(v);
        else if (!strcmp(key, "gi")) p->gi = (unsigned)strtoul(v, NULL, 10);
        else if (!strcmp(key, "ci")) p->ci = (unsigned)strtoul(v, NULL, 10);
        return;
    }
    if (!strcmp(key, "uuid")) snprintf(d->uuid, sizeof d->uuid, "%s", v);
    else if (!strcmp(key, "name")) snprintf(d->name, sizeof d->name, "%s", v);
    else if (!strcmp(key, "total")) d->total = parse_u64(v);
    else if (!strcmp(key, "reserved")) d->reserved = parse_u64(v);
    else if (!strcmp(key, "used")) d->used = parse_u64(v);
    else if (!strcmp(key, "util_gpu")) d->util_gpu = (unsigned)strtoul(v, NULL, 10);
    else if (!strcmp(key, "util_mem")) d->util_mem = (unsigned)strtoul(v, NULL, 10);
    else if (!strcmp(key, "lost")) d->lost = atoi(v);
    else if (!strcmp(key, "handle_rc")) d->handle_rc = atoi(v);
    else if (!strcmp(key, "uuid_rc")) d->uuid_rc = atoi(v);
    else if (!strcmp(key, "memory_rc")) d->memory_rc = atoi(v);
    else if (!strcmp(key, "memory_v1_rc")) d->memory_v1_rc = atoi(v);
    else if (!strcmp(key, "util_rc")) d->util_rc = atoi(v);
    else if (!strcmp(key, "proc_rc")) d->proc_rc = atoi(v);
    else if (!strcmp(key, "mig")) d->mig_mode = atoi(v);
    else if (!strcmp(key, "max_mig")) d->max_mig = (unsigned)strtoul(v, NULL, 10);
}

/* Reads the state file; with the lock held. */
static void load_state(void) {
    const char *static_only = getenv("FAKE_NVML_STATIC");
    if (g_loaded && static_only && !strcmp(static_only, "1")) return;
    for (int i = 0; i < MAX_DEV; i++) {
        reset_dev(&g_dev[i]);
        for (int j = 0; j < MAX_MIG; j++) reset_dev(&g_mig[i][j]);
    }
    g_nprocs = g_count = 0;
    g_init_rc = g_count_rc = g_driver_rc = g_block_memory = 0;
    g_entry_bytes = 24;
    snprintf(g_driver, sizeof g_driver, "550.54.15");
    g_loaded = 1;

    const char *path = getenv("FAKE_NVML_STATE");
    FILE *f = path ? fopen(path, "r") : NULL;
    if (!f) { g_init_rc = DRIVER_NOT_LOADED; return; }
    char line[1024];
    fdev *cur = NULL;
    while (fgets(line, sizeof line, f)) {
        char *hash = strchr(line, '#');
        if (hash) *hash = 0;
        char *save = NULL;
        char *word = strtok_r(line, " \t\r\n", &save);
        if (!word) continue;
        fdev *d = NULL;
        fproc *p = NULL;
        if (!strcmp(word, "device")) {
            if (g_count >= MAX_DEV) continue;
            d = &g_dev[g_count];
            d->present = 1;
            d->parent = g_count++;
            cur = d;
        } else if (!strcmp(word, "mig")) {
            if (!g_count) continue;
            int parent = g_count - 1;
            /* slot= must come first on a mig line */
            char *first = strtok_r(NULL, " \t\r\n", &save);
            if (!first || strncmp(first, "slot=", 5)) continue;
            int slot = atoi(first + 5);
            if (slot < 0 || slot >= MAX_MIG) continue;
            d = &g_mig[parent][slot];
            d->present = d->is_mig = 1;
            d->parent = parent;
            d->slot = slot;
            cur = d;
        } else if (!strcmp(word, "proc")) {
            if (!cur || g_nprocs >= MAX_PROCS) continue;
            if (cur->nproc == 0) cur->proc_start = g_nprocs;
            /* processes of one device are contiguous: the file lists them together */
            p = &g_procs[g_nprocs++];
            memset(p, 0, sizeof *p);
            p->gi = p->ci = 0xFFFFFFFFu;
            cur->nproc++;
        } else {
            char *v = strtok_r(NULL, " \t\r\n", &save);
            if (!v) continue;
            if (!strcmp(word, "driver")) snprintf(g_driver, sizeof g_driver, "%s", v);
            else if (!strcmp(word, "driver_rc")) g_driver_rc = atoi(v);
            else if (!strcmp(word, "init_rc")) g_init_rc = atoi(v);
            else if (!strcmp(word, "count_rc")) g_count_rc = atoi(v);
            else if (!strcmp(word, "entry_bytes")) g_entry_bytes = atoi(v);
            else if (!strcmp(word, "block_memory")) g_block_memory = atoi(v);
            continue;
        }
        char *kv;
        while ((kv = strtok_r(NULL, " \t\r\n", &save))) {
            char *eq = strchr(kv, '=');
            if (!eq) continue;
            *eq = 0;
            set_field(d, p, kv, eq + 1);
        }
    }
    fclose(f);
}

/* Every call starts here: lock, count, reload, check initialisation. */
static int enter(const char *name, int needs_init) {
    lock_mu();
    count_call(name);
    load_state();
    if (needs_init && (g_refcount == 0 || g_init_pid != getpid())) return UNINITIALIZED;
    return SUCCESS;
}

static int leave(int rc) {
    unlock_mu();
    return rc;
}

static fdev *as_dev(void *handle) {
    fdev *d = (fdev *)handle;
    int phys = d >= &g_dev[0] && d < &g_dev[MAX_DEV];
    int mig = d >= &g_mig[0][0] && d < &g_mig[0][0] + MAX_DEV * MAX_MIG;
    if (!phys && !mig) return NULL;
    if (!d->present || (phys && d - g_dev >= g_count)) return NULL;
    return d;
}

/* -- init ---------------------------------------------------------------------- */

static int do_init(const char *name) {
    enter(name, 0);
    if (g_init_rc) return leave(g_init_rc);
    if (g_init_pid != getpid()) { g_refcount = 0; g_init_pid = getpid(); }
    g_refcount++;
    return leave(SUCCESS);
}

int nvmlInit_v2(void) { return do_init("nvmlInit_v2"); }

#ifndef NO_INIT_WITH_FLAGS
int nvmlInitWithFlags(unsigned flags) { (void)flags; return do_init("nvmlInitWithFlags"); }
#endif

int nvmlShutdown(void) {
    int rc = enter("nvmlShutdown", 1);
    if (rc) return leave(rc);
    g_refcount--;
    return leave(SUCCESS);
}

const char *nvmlErrorString(int rc) {
    switch (rc) {
    case SUCCESS: return "Success";
    case UNINITIALIZED: return "Uninitialized";
    case NOT_SUPPORTED: return "Not Supported";
    case GPU_IS_LOST: return "GPU is lost";
    default: return "Fake NVML error";
    }
}

int nvmlSystemGetDriverVersion(char *version, unsigned length) {
    int rc = enter("nvmlSystemGetDriverVersion", 1);
    if (rc) return leave(rc);
    if (g_driver_rc) return leave(g_driver_rc);
    if (strlen(g_driver) + 1 > length) return leave(INSUFFICIENT_SIZE);
    snprintf(version, length, "%s", g_driver);
    return leave(SUCCESS);
}

/* -- devices ------------------------------------------------------------------- */

int nvmlDeviceGetCount_v2(unsigned *count) {
    int rc = enter("nvmlDeviceGetCount_v2", 1);
    if (rc) return leave(rc);
    if (g_count_rc) return leave(g_count_rc);
    *count = (unsigned)g_count;
    return leave(SUCCESS);
}

int nvmlDeviceGetHandleByIndex_v2(unsigned index, void **device) {
    int rc = enter("nvmlDeviceGetHandleByIndex_v2", 1);
    if (rc) return leave(rc);
    if (index >= (unsigned)g_count) return leave(INVALID_ARGUMENT);
    fdev *d = &g_dev[index];
    if (d->lost) return leave(GPU_IS_LOST);
    if (d->handle_rc) return leave(d->handle_rc);
    *device = d;
    return leave(SUCCESS);
}

static int copy_str(const char *src, char *dst, unsigned length) {
    if (strlen(src) + 1 > length) return INSUFFICIENT_SIZE;
    snprintf(dst, length, "%s", src);
    return SUCCESS;
}

int nvmlDeviceGetUUID(void *device, char *uuid, unsigned length) {
    int rc = enter("nvmlDeviceGetUUID", 1);
    if (rc) return leave(rc);
    fdev *d = as_dev(device);
    if (!d) return leave(INVALID_ARGUMENT);
    if (d->lost) return leave(GPU_IS_LOST);
    if (d->uuid_rc) return leave(d->uuid_rc);
    return leave(copy_str(d->uuid, uuid, length));
}

int nvmlDeviceGetName(void *device, char *name, unsigned length) {
    int rc = enter("nvmlDeviceGetName", 1);
    if (rc) return leave(rc);
    fdev *d = as_dev(device);
    if (!d) return leave(INVALID_ARGUMENT);
    if (d->lost) return leave(GPU_IS_LOST);
    return leave(copy_str(d->name, name, length));
}

/* -- memory -------------------------------------------------------------------- */

typedef struct { unsigned long long total, free, used; } mem_v1;
typedef struct { unsigned version; unsigned long long total, reserved, free, used; } mem_v2;

static unsigned long long free_of(const fdev *d) {
    unsigned long long taken = d->reserved + d->used;
    return taken >= d->total ? 0 : d->total - taken;
}

int nvmlDeviceGetMemoryInfo(void *device, mem_v1 *memory) {
    int rc = enter("nvmlDeviceGetMemoryInfo", 1);
    if (rc) return leave(rc);
    fdev *d = as_dev(device);
    if (!d) return leave(INVALID_ARGUMENT);
    if (d->lost) return leave(GPU_IS_LOST);
    if (d->memory_v1_rc) return leave(d->memory_v1_rc);
    memory->total = d->total;
    memory->free = free_of(d);
    memory->used = d->used + d->reserved;
    return leave(SUCCESS);
}

#ifndef NO_MEMORY_V2
/* Waits while the state says block_memory 1: proves the caller let go of the GIL. */
static int wait_unblocked(void) {
    for (int i = 0; i < 5000; i++) {
        lock_mu();
        load_state();
        int blocked = g_block_memory;
        unlock_mu();
        if (!blocked) return SUCCESS;
        usleep(1000);
    }
    return TIMEOUT;
}

int nvmlDeviceGetMemoryInfo_v2(void *device, mem_v2 *memory) {
    int rc = enter("nvmlDeviceGetMemoryInfo_v2", 1);
    int blocked = g_block_memory;
    unlock_mu();
    if (blocked && wait_unblocked() != SUCCESS) return TIMEOUT;
    lock_mu();
    if (rc) return leave(rc);
    fdev *d = as_dev(device);
    if (!d) return leave(INVALID_ARGUMENT);
    if (d->lost) return leave(GPU_IS_LOST);
    if (d->memory_rc) return leave(d->memory_rc);
    if (memory->version != MEMORY_V2_VERSION) return leave(ARGUMENT_VERSION_MISMATCH);
    memory->total = d->total;
    memory->reserved = d->reserved;
    memory->free = free_of(d);
    memory->used = d->used;
    return leave(SUCCESS);
}
#endif

/* -- utilisation --------------------------------------------------------------- */

#ifndef NO_UTILIZATION
typedef struct { unsigned gpu, memory; } util_t;

int nvmlDeviceGetUtilizationRates(void *device, util_t *util) {
    int rc = enter("nvmlDeviceGetUtilizationRates", 1);
    if (rc) return leave(rc);
    fdev *d = as_dev(device);
    if (!d) return leave(INVALID_ARGUMENT);
    if (d->lost) return leave(GPU_IS_LOST);
    if (d->is_mig || d->mig_mode == 1) return leave(NOT_SUPPORTED);
    if (d->util_rc) return leave(d->util_rc);
    util->gpu = d->util_gpu;
    util->memory = d->util_mem;
    return leave(SUCCESS);
}
#endif

/* -- processes ----------------------------------------------------------------- */

static int list_procs(const char *name, void *device, unsigned *count, void *infos, int stride) {
    int rc = enter(name, 1);
    if (rc) return leave(rc);
    fdev *d = as_dev(device);
    if (!d) return leave(INVALID_ARGUMENT);
    if (d->lost) return leave(GPU_IS_LOST);
    if (d->proc_rc == INSUFFICIENT_SIZE) { *count = (unsigned)d->nproc + 1; return leave(INSUFFICIENT_SIZE); }
    if (d->proc_rc) return leave(d->proc_rc);
    unsigned n = (unsigned)d->nproc;
    if (*count < n) { *count = n; return leave(INSUFFICIENT_SIZE); }
    *count = n;
    for (unsigned i = 0; i < n; i++) {
        const fproc *p = &g_procs[d->proc_start + i];
        unsigned char *e = (unsigned char *)infos + (size_t)i * (size_t)stride;
        memset(e, 0, (size_t)stride);
        memcpy(e, &p->pid, 4);
        memcpy(e + 8, &p->used, 8);
        if (stride >= 24) {
            memcpy(e + 16, &p->gi, 4);
            memcpy(e + 20, &p->ci, 4);
        }
        if (stride >= 32) {
            /* usedGpuCcProtectedMemory: a reader with the 24-byte layout
               takes it for the next entry's pid and size */
            unsigned long long cc = 0x5A5A5A5A5A5A5A5Aull;
            memcpy(e + 24, &cc, 8);
        }
    }
    return leave(SUCCESS);
}

int nvmlDeviceGetComputeRunningProcesses(void *device, unsigned *count, void *infos) {
    return list_procs("nvmlDeviceGetComputeRunningProcesses", device, count, infos, 16);
}

#ifndef NO_PROCS_V2
int nvmlDeviceGetComputeRunningProcesses_v2(void *device, unsigned *count, void *infos) {
    return list_procs("nvmlDeviceGetComputeRunningProcesses_v2", device, count, infos, g_entry_bytes);
}
#endif

#ifndef NO_PROCS_V3
int nvmlDeviceGetComputeRunningProcesses_v3(void *device, unsigned *count, void *infos) {
    return list_procs("nvmlDeviceGetComputeRunningProcesses_v3", device, count, infos, g_entry_bytes);
}
#endif

#ifdef CONF_COMPUTE
int nvmlDeviceGetConfComputeMemSizeInfo(void *device, void *info) {
    (void)device; (void)info;
    return NOT_SUPPORTED;
}
#endif

#ifdef PROCESS_DETAIL_LIST
int nvmlDeviceGetRunningProcessDetailList(void *device, void *plist) {
    (void)device; (void)plist;
    return NOT_SUPPORTED;
}
#endif

/* -- MIG ----------------------------------------------------------------------- */

#ifndef NO_MIG
int nvmlDeviceGetMigMode(void *device, unsigned *current, unsigned *pending) {
    int rc = enter("nvmlDeviceGetMigMode", 1);
    if (rc) return leave(rc);
    fdev *d = as_dev(device);
    if (!d) return leave(INVALID_ARGUMENT);
    if (d->lost) return leave(GPU_IS_LOST);
    if (d->is_mig || d->mig_mode < 0) return leave(NOT_SUPPORTED);
    *current = *pending = (unsigned)d->mig_mode;
    return leave(SUCCESS);
}

int nvmlDeviceGetMaxMigDeviceCount(void *device, unsigned *count) {
    int rc = enter("nvmlDeviceGetMaxMigDeviceCount", 1);
    if (rc) return leave(rc);
    fdev *d = as_dev(device);
    if (!d) return leave(INVALID_ARGUMENT);
    if (d->is_mig || d->mig_mode < 0) return leave(NOT_SUPPORTED);
    *count = d->max_mig < MAX_MIG ? d->max_mig : MAX_MIG;
    return leave(SUCCESS);
}

int nvmlDeviceGetMigDeviceHandleByIndex(void *device, unsigned index, void **mig) {
    int rc = enter("nvmlDeviceGetMigDeviceHandleByIndex", 1);
    if (rc) return leave(rc);
    fdev *d = as_dev(device);
    if (!d || d->is_mig) return leave(INVALID_ARGUMENT);
    if (d->mig_mode != 1) return leave(NOT_SUPPORTED);
    if (index >= d->max_mig || index >= MAX_MIG) return leave(INVALID_ARGUMENT);
    fdev *m = &g_mig[d - g_dev][index];
    if (!m->present) return leave(NOT_FOUND);
    if (m->handle_rc) return leave(m->handle_rc);
    *mig = m;
    return leave(SUCCESS);
}
#endif
