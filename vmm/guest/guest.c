/*
 * Godwit's built-in guest programs: idle, dirty, spin, ticker and echo.
 *
 * The contract with the monitor (memory layout, ABI block, ports, workloads) is
 * docs/guest-abi.md. This runs freestanding (no libc) in 64-bit long mode at CPL3 with interrupts
 * off: every exit to the monitor is an `out`, and any exception ends the VM (triple fault). CR4
 * has no OSFXSR, so the whole program is built with -mgeneral-regs-only (SSE would #UD).
 * Guest memory is identity mapped, so guest physical addresses are used directly as pointers.
 */

#include <stddef.h>
#include <stdint.h>

/* ---------------------------------------------------------------------------------------- */
/* The ABI block at 0x5_0000 (docs/guest-abi.md, "The ABI block").                          */

#define ABI_MAGIC 0x54574447u /* "GDWT" */
#define ABI_VERSION 1u

/*
 * At most 40 vCPUs: vCPU i's 16 KiB stack ends at 0x6_0000 + (i+1) * 0x4000, and the 40th
 * stack ends where this program starts (0x10_0000). (The status slots would allow 60.)
 */
#define MAX_VCPUS 40u

enum kind { KIND_IDLE = 0, KIND_DIRTY = 1, KIND_SPIN = 2, KIND_TICKER = 3, KIND_ECHO = 4 };
enum pattern { PATTERN_UNIFORM = 0, PATTERN_HOTCOLD = 1 };

/* Status of one vCPU: written by the guest, read by the monitor. */
struct status {
	uint64_t progress;
	uint64_t verify_errors;
	uint64_t first_error_page; /* working-set page index + 1, 0 = none */
	uint64_t verified_pages;
	uint64_t running;
	uint64_t reserved[3];
};

struct abi {
	uint32_t magic;
	uint32_t version;
	uint32_t kind;
	uint32_t vcpus;
	uint64_t tsc_hz;
	uint64_t ws_base;
	uint64_t ws_pages;
	uint64_t gen_base;
	uint64_t rate_bytes_per_s;
	uint32_t pattern;
	uint32_t hot_percent;
	uint64_t hot_pages;
	uint32_t duty_percent;
	uint32_t interval_ms;
	uint64_t seed;
	uint32_t content;
	uint32_t disk_ops_per_s;
	uint8_t reserved[0x100 - 0x60];
	struct status status[];
};

/*
 * What the guest did with its devices, at ABI + 0xc00 (written by vCPU 0, which serves them).
 */
struct devstatus {
	uint64_t disk_blocks;      /* blocks tracked: min(capacity, DISK_TRACK_MAX) */
	uint64_t disk_writes;
	uint64_t disk_verified;
	uint64_t disk_errors;
	uint64_t disk_first_error; /* block + 1, 0 = none */
	uint64_t disk_passes;
	uint64_t disk_io_errors;
	uint64_t entropy_reads;
	uint64_t entropy_device;
	uint64_t echo_lines;
	uint64_t echo_bytes;
};

/* A block request at ABI + 0xd00, its GPA written to PORT_BLOCK. */
struct blkreq {
	uint32_t op;      /* 1 read, 2 write, 3 flush */
	uint32_t status;  /* written by the monitor: 0 ok, 1 I/O error, 2 bad request, 3 no disk */
	uint64_t block;   /* first 4 KiB block */
	uint64_t gpa;     /* buffer */
	uint32_t count;   /* blocks, 1-64 */
	uint32_t reserved;
};

#define DEVSTATUS_OFFSET 0xc00u
#define BLKREQ_OFFSET 0xd00u
#define DISK_GEN_ADDR 0x51000u   /* u16 generation per tracked block, up to DISK_BUF_ADDR */
#define DISK_BUF_ADDR 0x5f000u   /* one 4 KiB block buffer */
#define DISK_TRACK_MAX ((DISK_BUF_ADDR - DISK_GEN_ADDR) / 2)

/* The layout is the contract: fail the build if the compiler disagrees. */
_Static_assert(sizeof(struct status) == 64, "status is 64 bytes");
_Static_assert(offsetof(struct abi, kind) == 0x08, "kind");
_Static_assert(offsetof(struct abi, tsc_hz) == 0x10, "tsc_hz");
_Static_assert(offsetof(struct abi, ws_base) == 0x18, "ws_base");
_Static_assert(offsetof(struct abi, ws_pages) == 0x20, "ws_pages");
_Static_assert(offsetof(struct abi, gen_base) == 0x28, "gen_base");
_Static_assert(offsetof(struct abi, rate_bytes_per_s) == 0x30, "rate_bytes_per_s");
_Static_assert(offsetof(struct abi, pattern) == 0x38, "pattern");
_Static_assert(offsetof(struct abi, hot_percent) == 0x3c, "hot_percent");
_Static_assert(offsetof(struct abi, hot_pages) == 0x40, "hot_pages");
_Static_assert(offsetof(struct abi, duty_percent) == 0x48, "duty_percent");
_Static_assert(offsetof(struct abi, interval_ms) == 0x4c, "interval_ms");
_Static_assert(offsetof(struct abi, seed) == 0x50, "seed");
_Static_assert(offsetof(struct abi, content) == 0x58, "content");
_Static_assert(offsetof(struct abi, disk_ops_per_s) == 0x5c, "disk_ops_per_s");
_Static_assert(sizeof(struct devstatus) == 88, "devstatus");
_Static_assert(sizeof(struct blkreq) == 32, "blkreq");
_Static_assert(offsetof(struct abi, status) == 0x100, "status");
_Static_assert(offsetof(struct status, running) == 0x20, "running");

/* The status slots must stay inside the ABI page. */
_Static_assert(0x100 + 64 * MAX_VCPUS <= DEVSTATUS_OFFSET, "status slots end before the device status");

/* ---------------------------------------------------------------------------------------- */
/* Ports (docs/guest-abi.md, "Ports") and panic codes.                                      */

#define PORT_COM1 0x3f8
#define PORT_SLEEP 0x500
#define PORT_VERIFY_ERROR 0x504
#define PORT_PANIC 0x508
#define PORT_BLOCK 0x510        /* out32: GPA of a struct blkreq */
#define PORT_BLOCK_BLOCKS 0x514 /* in32: disk capacity in 4 KiB blocks, 0 = no disk */
#define PORT_ENTROPY 0x520      /* in32: 32 random bits */
#define PORT_ENTROPY_ID 0x524   /* in32: identifier of the bound entropy device, 0 = none */
#define PORT_STREAM 0x530       /* in32: 0x100 | byte received, or 0; out8: send a byte */
#define PORT_STREAM_PRESENT 0x534 /* in32: 1 when an endpoint stream is attached */

#define SLEEP_FOREVER 0xffffffffu   /* "until woken" */
#define SLEEP_MAX_US 0xfffffffeu    /* longest finite sleep */

/* Codes sent to the panic port. The monitor only logs them; they are not part of the ABI. */
enum panic_code {
	PANIC_BAD_MAGIC = 1,
	PANIC_BAD_VERSION = 2,
	PANIC_BAD_VCPUS = 3,     /* vcpus is 0 or > MAX_VCPUS, or our index is >= vcpus */
	PANIC_UNKNOWN_KIND = 4,
	PANIC_BAD_TSC_HZ = 5,    /* below 1 MHz: the time arithmetic needs whole ticks per us */
	PANIC_BAD_WORKING_SET = 6, /* ws_pages 0, or the table/working set overlap or are misplaced */
	PANIC_BAD_PATTERN = 7,   /* unknown pattern or hot_percent > 100 */
	PANIC_BAD_DUTY = 8,      /* duty_percent > 100 */
	PANIC_BAD_INTERVAL = 9,  /* interval_ms == 0 */
};

/* ---------------------------------------------------------------------------------------- */
/* Freestanding helpers.                                                                    */

/*
 * gcc may emit calls to memset/memcpy for struct copies and simple loops even with
 * -ffreestanding, so provide them. `rep stosb/movsb` also keeps gcc from turning these very
 * loops back into calls to themselves.
 */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *restrict dst, const void *restrict src, size_t n);

void *memset(void *dst, int c, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
	return dst;
}

void *memcpy(void *restrict dst, const void *restrict src, size_t n)
{
	void *d = dst;
	__asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) : : "memory");
	return dst;
}

void guest_main(uint32_t vcpu, volatile struct abi *abi);

/*
 * Port output exits to the monitor, which may read guest memory (status, pages) while
 * handling it: the "memory" clobber makes gcc finish all earlier stores first.
 */
static inline void outb(uint16_t port, uint8_t v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline void outl(uint16_t port, uint32_t v)
{
	__asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory");
}

static inline uint32_t inl(uint16_t port)
{
	uint32_t v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory");
	return v;
}

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((uint64_t)hi << 32) | lo;
}

/* Signed distance from `from` to `to` in TSC ticks (the TSC may jump either way on migration). */
static inline int64_t ticks_until(uint64_t to, uint64_t from)
{
	return (int64_t)(to - from);
}

static void sleep_us(uint32_t us)
{
	outl(PORT_SLEEP, us);
}

static __attribute__((noreturn)) void idle_forever(void)
{
	/* Looped: a pause or stop of the VM ends the sleep early. */
	for (;;)
		sleep_us(SLEEP_FOREVER);
}

static __attribute__((noreturn)) void panic(uint32_t code)
{
	outl(PORT_PANIC, code);
	idle_forever();
}

/*
 * Sleep for `ticks` TSC ticks (rounded up to whole microseconds), at least `min_us`.
 * The monitor may end the sleep early, so callers re-read the TSC afterwards.
 */
static void sleep_ticks(uint64_t ticks, uint64_t ticks_per_us, uint32_t min_us)
{
	uint64_t us = ticks / ticks_per_us + 1;

	if (us < min_us)
		us = min_us;
	if (us > SLEEP_MAX_US)
		us = SLEEP_MAX_US;
	sleep_us((uint32_t)us);
}

/* ---------------------------------------------------------------------------------------- */
/* Pseudo-random numbers: xorshift64* (Vigna), small and good enough to spread page picks.  */

static uint64_t rng_seed(uint64_t seed, uint32_t vcpu)
{
	/*
	 * Seeds that differ in one bit (seed ^ vcpu) give visibly correlated xorshift streams at
	 * first, so scramble them with the splitmix64 finaliser; xorshift must not start at 0.
	 */
	uint64_t z = (seed ^ vcpu) + 0x9e3779b97f4a7c15ull;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	z ^= z >> 31;
	return z ? z : 0x9e3779b97f4a7c15ull;
}

static uint64_t rng_next(uint64_t *state)
{
	uint64_t x = *state;
	x ^= x >> 12;
	x ^= x << 25;
	x ^= x >> 27;
	*state = x;
	return x * 0x2545f4914f6cdd1dull;
}

/* Uniform in [0, n) without a division: the high half of a 64x64-bit product (one `mul`). */
static uint64_t rng_below(uint64_t *state, uint64_t n)
{
	return (uint64_t)(((unsigned __int128)rng_next(state) * n) >> 64);
}

/* ---------------------------------------------------------------------------------------- */
/* idle                                                                                     */

static __attribute__((noreturn)) void run_idle(void)
{
	idle_forever();
}

/* ---------------------------------------------------------------------------------------- */
/* dirty                                                                                    */

#define PAGE_SHIFT 12
#define PAGE_SIZE 4096u
#define WORDS_PER_PAGE (PAGE_SIZE / 8)

#define MAX_BATCH 16u          /* pages written between verification steps and token checks */
#define VERIFY_PER_WRITE 4u    /* pages verified per page written */
#define VERIFY_PER_WAKE 256u   /* pages verified after each sleep, at least */
#define MIN_SLEEP_US 1000u     /* shortest sleep when out of tokens: bounds the exit rate */

struct dirty {
	volatile struct status *st;
	volatile uint32_t *gen;   /* generation table, one u32 per working-set page */
	uint64_t ws_base;
	uint64_t first;           /* this vCPU's part: working-set pages [first, first + count) */
	uint64_t count;
	uint64_t hot;             /* hotcold: the first `hot` pages of the part are hot; 0 = uniform */
	uint32_t hot_percent;
	uint32_t random;          /* content: 0 counter pattern, 1 incompressible */
	uint64_t rng;
	uint64_t sweep;           /* next page of the part to verify, 0..count-1 */
	/* Local copies of the counters, published to the status with volatile stores. */
	uint64_t written;
	uint64_t verified;
	uint64_t errors;
};

static uint64_t *page_ptr(const struct dirty *d, uint64_t p)
{
	return (uint64_t *)(uintptr_t)(d->ws_base + (p << PAGE_SHIFT));
}

/* splitmix64's finalizer: one 64-bit word of incompressible content. */
static inline uint64_t mix64(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	return z ^ (z >> 31);
}

/*
 * Word i of page p at generation g. Counter content: ((p << 32) | g) + i (compresses about
 * 7:1). Random content: mix64 of that value (does not compress). Generation 0 is all zeros
 * either way, so memory the guest never wrote stays zero.
 */
static inline uint64_t word(uint64_t base, uint32_t i, uint32_t random)
{
	return random ? mix64(base + i) : base + i;
}

static void fill_page(uint64_t *w, uint64_t p, uint32_t g, uint32_t random)
{
	uint64_t base = ((p << 32) | g);

	if (!g) {
		for (uint32_t i = 0; i < WORDS_PER_PAGE; i++)
			w[i] = 0;
		return;
	}
	for (uint32_t i = 0; i < WORDS_PER_PAGE; i++)
		w[i] = word(base, i, random);
}

/*
 * Whole-page compare against the expected content. Volatile reads: the point is to look at
 * what memory holds now (after a migration, say), never at what gcc remembers writing.
 */
static int page_matches(const volatile uint64_t *w, uint64_t p, uint32_t g, uint32_t random)
{
	uint64_t base = ((p << 32) | g);
	uint64_t diff = 0;

	if (!g) {
		for (uint32_t i = 0; i < WORDS_PER_PAGE; i++)
			diff |= w[i];
		return diff == 0;
	}
	for (uint32_t i = 0; i < WORDS_PER_PAGE; i++)
		diff |= w[i] ^ word(base, i, random);
	return diff == 0;
}

/* Pick a working-set page of this vCPU's part, following the pattern. */
static uint64_t pick_page(struct dirty *d)
{
	if (d->hot) {
		/* hot_percent% of the picks from the hot pages, the rest from the cold ones. */
		if (rng_below(&d->rng, 100) < d->hot_percent)
			return d->first + rng_below(&d->rng, d->hot);
		return d->first + d->hot + rng_below(&d->rng, d->count - d->hot);
	}
	return d->first + rng_below(&d->rng, d->count);
}

static void write_one_page(struct dirty *d)
{
	uint64_t p = pick_page(d);
	uint32_t g = d->gen[p] + 1;

	/* Generation 0 means "never written" (all zeros): skip it when the counter wraps. */
	if (g == 0)
		g = 1;
	/* Table first, then the page, as docs/guest-abi.md describes; the barrier keeps the
	 * compiler from reordering the two. */
	d->gen[p] = g;
	__asm__ volatile("" ::: "memory");
	fill_page(page_ptr(d, p), p, g, d->random);
	d->written++;
}

/* Verify the next `n` pages of the sweep (at most the whole part once). */
static void verify_pages(struct dirty *d, uint64_t n)
{
	if (n > d->count)
		n = d->count;
	for (uint64_t i = 0; i < n; i++) {
		uint64_t p = d->first + d->sweep;
		uint32_t g = d->gen[p];

		if (++d->sweep == d->count)
			d->sweep = 0;
		d->verified++;
		if (page_matches(page_ptr(d, p), p, g, d->random))
			continue;

		/* Publish the count before the exit, so the monitor's log and status agree. */
		d->errors++;
		d->st->verify_errors = d->errors;
		if (d->st->first_error_page == 0)
			d->st->first_error_page = p + 1;
		outl(PORT_VERIFY_ERROR, (uint32_t)p);
		/*
		 * Rewrite the page as its recorded generation says, so that one corruption is
		 * counted once rather than on every later sweep. The report above keeps the evidence.
		 */
		fill_page(page_ptr(d, p), p, g, d->random);
	}
	d->st->verified_pages = d->verified;
}

/*
 * Token bucket on the TSC, kept as "the TSC value at which the bucket was empty" (`empty_at`):
 * the credit at time `now` is now - empty_at ticks, capped at `burst`. A batch costs `cost`
 * ticks of credit. This needs no division per batch.
 */
struct bucket {
	uint64_t cost;     /* ticks of credit one batch costs */
	uint64_t burst;    /* most credit the bucket holds: 100 ms worth (at least one batch) */
	uint64_t empty_at;
};

/* Take one batch's worth of credit: 0 if taken, otherwise the ticks to wait for it. */
static uint64_t bucket_take(struct bucket *b, uint64_t now)
{
	int64_t credit = ticks_until(now, b->empty_at);

	if (credit < 0) {
		/* The TSC went backwards (a migration between hosts): restart with an empty bucket. */
		b->empty_at = now;
		credit = 0;
	} else if ((uint64_t)credit > b->burst) {
		b->empty_at = now - b->burst;
		credit = (int64_t)b->burst;
	}
	if ((uint64_t)credit >= b->cost) {
		b->empty_at += b->cost;
		return 0;
	}
	return b->cost - (uint64_t)credit;
}

/* ---------------------------------------------------------------------------------------- */
/* Devices: the disk, the entropy device and the endpoint stream, served by vCPU 0 of the   */
/* dirty and echo guests (docs/guest-abi.md, "Devices").                                     */

#define LINE_MAX 256u
#define DISK_OPS_PER_CALL 8u

struct services {
	volatile struct devstatus *ds;
	volatile uint16_t *gen;     /* disk generation per tracked block */
	uint64_t blocks;            /* tracked blocks, 0 = no disk */
	uint64_t cursor;            /* next block to verify */
	uint64_t seed;
	uint64_t rng;
	struct bucket disk;         /* disk operations (a write and a verify each) */
	uint32_t entropy;           /* an entropy device is attached */
	uint32_t stream;            /* an endpoint stream is attached */
	uint32_t line_len;
	char line[LINE_MAX];
};

/* Word i of disk block b at generation g (g = 0: a block never written reads as zeros). */
static inline uint64_t disk_word(const struct services *s, uint64_t b, uint32_t g, uint32_t i)
{
	return mix64(s->seed ^ (b << 32) ^ ((uint64_t)g << 12) ^ i);
}

static uint32_t blk_io(uint32_t op, uint64_t block)
{
	volatile struct blkreq *r = (volatile struct blkreq *)(uintptr_t)(0x50000u + BLKREQ_OFFSET);

	r->op = op;
	r->status = 0xffffffffu;
	r->block = block;
	r->gpa = DISK_BUF_ADDR;
	r->count = 1;
	outl(PORT_BLOCK, 0x50000u + BLKREQ_OFFSET);
	return r->status;
}

static void disk_write_one(struct services *s)
{
	uint64_t b = rng_below(&s->rng, s->blocks);
	uint32_t g = (uint32_t)s->gen[b] + 1;
	uint64_t *w = (uint64_t *)(uintptr_t)DISK_BUF_ADDR;

	if (g > 0xffff)
		g = 1;
	for (uint32_t i = 0; i < WORDS_PER_PAGE; i++)
		w[i] = disk_word(s, b, g, i);
	if (blk_io(2, b) != 0) {
		s->ds->disk_io_errors++;
		return;
	}
	/* Recorded only once the write is done: a block's generation is what the disk holds. */
	s->gen[b] = (uint16_t)g;
	s->ds->disk_writes++;
}

static void disk_verify_one(struct services *s)
{
	uint64_t b = s->cursor;
	const volatile uint64_t *w = (const volatile uint64_t *)(uintptr_t)DISK_BUF_ADDR;

	if (blk_io(1, b) != 0) {
		s->ds->disk_io_errors++;
		return;
	}
	uint32_t g = s->gen[b];
	int ok = 1;
	for (uint32_t i = 0; i < WORDS_PER_PAGE; i++) {
		if (w[i] != (g ? disk_word(s, b, g, i) : 0)) {
			ok = 0;
			break;
		}
	}
	if (!ok) {
		if (!s->ds->disk_errors)
			s->ds->disk_first_error = b + 1;
		s->ds->disk_errors++;
	}
	s->ds->disk_verified++;
	if (++s->cursor == s->blocks) {
		s->cursor = 0;
		s->ds->disk_passes++;
	}
}

static void services_init(struct services *s, volatile struct abi *abi)
{
	uint64_t capacity = inl(PORT_BLOCK_BLOCKS);

	s->ds = (volatile struct devstatus *)((uintptr_t)abi + DEVSTATUS_OFFSET);
	s->gen = (volatile uint16_t *)(uintptr_t)DISK_GEN_ADDR;
	s->blocks = capacity < DISK_TRACK_MAX ? capacity : DISK_TRACK_MAX;
	s->seed = abi->seed;
	s->rng = rng_seed(abi->seed, 0x5eed);
	s->entropy = inl(PORT_ENTROPY_ID) != 0;
	s->stream = inl(PORT_STREAM_PRESENT) == 1;
	s->ds->disk_blocks = s->blocks;
	if (s->blocks && abi->disk_ops_per_s) {
		uint64_t ops = abi->disk_ops_per_s;
		s->disk.cost = abi->tsc_hz / ops ? abi->tsc_hz / ops : 1;
		s->disk.burst = abi->tsc_hz / 10 > s->disk.cost ? abi->tsc_hz / 10 : s->disk.cost;
		s->disk.empty_at = rdtsc() - s->disk.cost;
	} else {
		s->blocks = 0;
		/* No disk to pace the entropy reads: 100 a second. */
		s->disk.cost = abi->tsc_hz / 100;
		s->disk.burst = s->disk.cost;
		s->disk.empty_at = rdtsc() - s->disk.cost;
	}
}

/* One round of device work; returns whether anything was done. */
static int services_run(struct services *s)
{
	int busy = 0;

	if (s->stream) {
		for (uint32_t n = 0; n < LINE_MAX; n++) {
			uint32_t v = inl(PORT_STREAM);
			if (!(v & 0x100))
				break;
			busy = 1;
			char c = (char)(v & 0xff);
			s->line[s->line_len++] = c;
			if (c == '\n' || s->line_len == LINE_MAX) {
				for (uint32_t i = 0; i < s->line_len; i++)
					outb(PORT_STREAM, (uint8_t)s->line[i]);
				s->ds->echo_bytes += s->line_len;
				if (c == '\n')
					s->ds->echo_lines++;
				s->line_len = 0;
			}
		}
	}
	if (s->blocks) {
		for (uint32_t n = 0; n < DISK_OPS_PER_CALL && !bucket_take(&s->disk, rdtsc()); n++) {
			disk_write_one(s);
			disk_verify_one(s);
			busy = 1;
			if (s->entropy) {
				(void)inl(PORT_ENTROPY);
				s->ds->entropy_reads++;
				s->ds->entropy_device = inl(PORT_ENTROPY_ID);
			}
		}
	} else if (s->entropy && !bucket_take(&s->disk, rdtsc())) {
		(void)inl(PORT_ENTROPY);
		s->ds->entropy_reads++;
		s->ds->entropy_device = inl(PORT_ENTROPY_ID);
		busy = 1;
	}
	return busy;
}


static __attribute__((noreturn)) void run_dirty(uint32_t vcpu, volatile struct abi *abi,
						volatile struct status *st)
{
	uint32_t vcpus = abi->vcpus;
	uint64_t tsc_hz = abi->tsc_hz;
	uint64_t ws_pages = abi->ws_pages;
	uint64_t ws_base = abi->ws_base;
	uint64_t gen_base = abi->gen_base;
	uint64_t rate = abi->rate_bytes_per_s;
	uint32_t pattern = abi->pattern;
	uint32_t hot_percent = abi->hot_percent;
	uint64_t hot_pages = abi->hot_pages;

	/*
	 * Sanity of the layout: the table and working set must lie above this program, page
	 * aligned, the table before the working set. A mistake here would overwrite the program
	 * or the page tables, which is much harder to diagnose than a panic.
	 */
	if (ws_pages == 0 || ws_pages > (1ull << 32) || (ws_base & (PAGE_SIZE - 1)) ||
	    (gen_base & 3) || gen_base < 0x200000 || gen_base + 4 * ws_pages > ws_base)
		panic(PANIC_BAD_WORKING_SET);
	if (pattern > PATTERN_HOTCOLD || hot_percent > 100 || abi->content > 1)
		panic(PANIC_BAD_PATTERN);
	if (tsc_hz < 1000000)
		panic(PANIC_BAD_TSC_HZ);

	struct dirty d = {
		.st = st,
		.gen = (volatile uint32_t *)(uintptr_t)gen_base,
		.ws_base = ws_base,
		/* An even split; parts differ by at most one page and cover the whole set. */
		.first = ws_pages * vcpu / vcpus,
		.count = ws_pages * (vcpu + 1) / vcpus - ws_pages * vcpu / vcpus,
		.hot_percent = hot_percent,
		.random = abi->content,
		.rng = rng_seed(abi->seed, vcpu),
	};
	if (pattern == PATTERN_HOTCOLD) {
		d.hot = hot_pages / vcpus;
		/* With no cold (or no hot) pages, every pick is uniform over the part. */
		if (d.hot >= d.count)
			d.hot = 0;
	}
	if (d.count == 0)
		idle_forever(); /* fewer pages than vCPUs: nothing for this one to do */

	/*
	 * Rate: this vCPU's share, as pages per batch and TSC ticks per batch. A batch is at most
	 * 10 ms worth of the rate (1..MAX_BATCH pages), so low rates are not bursty.
	 */
	uint64_t ticks_per_us = tsc_hz / 1000000;
	uint64_t batch = MAX_BATCH;
	struct bucket b = { 0 };
	if (rate) {
		uint64_t share = rate / vcpus;
		if (share == 0)
			share = 1;
		uint64_t pages_per_10ms = share / PAGE_SIZE / 100;
		batch = pages_per_10ms < 1 ? 1 : pages_per_10ms > MAX_BATCH ? MAX_BATCH : pages_per_10ms;
		b.cost = batch * PAGE_SIZE * tsc_hz / share; /* no overflow: batch * 4096 < 2^17 */
		if (b.cost == 0)
			b.cost = 1;
		b.burst = tsc_hz / 10 > b.cost ? tsc_hz / 10 : b.cost;
		b.empty_at = rdtsc() - b.cost; /* start with one batch of credit */
	}

	/* vCPU 0 also serves the devices, between batches. */
	struct services svc = { 0 };
	if (vcpu == 0)
		services_init(&svc, abi);

	for (;;) {
		if (vcpu == 0)
			services_run(&svc);
		if (rate) {
			uint64_t wait = bucket_take(&b, rdtsc());
			if (wait) {
				/* Out of tokens: sleep until a batch is earned (bounded exit rate). */
				sleep_ticks(wait, ticks_per_us, MIN_SLEEP_US);
				verify_pages(&d, VERIFY_PER_WAKE);
				continue;
			}
		}
		for (uint64_t i = 0; i < batch; i++)
			write_one_page(&d);
		st->progress = d.written;
		verify_pages(&d, VERIFY_PER_WRITE * batch);
	}
}


/* ---------------------------------------------------------------------------------------- */
/* echo                                                                                     */

#define ECHO_IDLE_SLEEP_US 2000u

static __attribute__((noreturn)) void run_echo(uint32_t vcpu, volatile struct abi *abi,
					       volatile struct status *st)
{
	struct services s = { 0 };

	if (abi->tsc_hz < 1000000)
		panic(PANIC_BAD_TSC_HZ);
	if (vcpu != 0)
		idle_forever();
	services_init(&s, abi);
	for (;;) {
		if (!services_run(&s))
			sleep_us(ECHO_IDLE_SLEEP_US);
		st->progress = s.ds->echo_lines;
	}
}

/* ---------------------------------------------------------------------------------------- */
/* spin                                                                                     */

static __attribute__((noreturn)) void run_spin(volatile struct abi *abi, volatile struct status *st)
{
	uint64_t tsc_hz = abi->tsc_hz;
	uint32_t duty = abi->duty_percent;

	if (tsc_hz < 1000000)
		panic(PANIC_BAD_TSC_HZ);
	if (duty > 100)
		panic(PANIC_BAD_DUTY);

	uint64_t ticks_per_us = tsc_hz / 1000000;
	uint64_t period = tsc_hz / 100; /* 10 ms */
	uint64_t busy = period / 100 * duty;
	uint64_t busy_tenth_ms = 0; /* each period adds duty/10 ms: count tenths to stay exact */
	uint64_t start = rdtsc();

	for (;;) {
		if (duty) {
			while (ticks_until(rdtsc(), start) < (int64_t)busy)
				;
			busy_tenth_ms += duty;
			st->progress = busy_tenth_ms / 10;
		}

		/* Sleep through the rest of the period (the sleep may end early: re-read the TSC). */
		uint64_t end = start + period;
		int64_t left = ticks_until(end, rdtsc());
		if (duty < 100 && left > 0)
			sleep_ticks((uint64_t)left, ticks_per_us, 0);

		/*
		 * Next period. If more than a period late (the VM was paused) or if the TSC went
		 * backwards (migration), start afresh from now rather than catching up.
		 */
		start = end;
		int64_t late = ticks_until(rdtsc(), start);
		if (late >= (int64_t)period || late < -(int64_t)period)
			start = rdtsc();
	}
}

/* ---------------------------------------------------------------------------------------- */
/* ticker                                                                                   */

static void serial_puts(const char *s)
{
	while (*s)
		outb(PORT_COM1, (uint8_t)*s++);
}

static void serial_put_u64(uint64_t v)
{
	char buf[20];
	int n = 0;

	do {
		buf[n++] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	while (n)
		outb(PORT_COM1, (uint8_t)buf[--n]);
}

static __attribute__((noreturn)) void run_ticker(uint32_t vcpu, volatile struct abi *abi,
						 volatile struct status *st)
{
	uint64_t tsc_hz = abi->tsc_hz;
	uint32_t interval_ms = abi->interval_ms;

	if (tsc_hz < 1000000)
		panic(PANIC_BAD_TSC_HZ);
	if (interval_ms == 0)
		panic(PANIC_BAD_INTERVAL);
	if (vcpu != 0)
		idle_forever();

	uint64_t ticks_per_us = tsc_hz / 1000000;
	uint64_t interval = tsc_hz / 1000 * interval_ms; /* no overflow below 4 THz */
	uint64_t next = rdtsc() + interval;   /* deadline of line n + 1: start + (n + 1) * interval */
	uint64_t n = 0;

	for (;;) {
		int64_t left = ticks_until(next, rdtsc());
		if (left > (int64_t)interval) {
			/* The TSC went backwards (migration): restart the schedule from now. */
			next = rdtsc() + interval;
			continue;
		}
		if (left > 0) {
			/* Not yet: sleep for the rest (it may end early, so check again). */
			sleep_ticks((uint64_t)left, ticks_per_us, 0);
			continue;
		}

		n++;
		serial_puts("tick ");
		serial_put_u64(n);
		serial_puts("\n");
		st->progress = n;

		/* Keep to the schedule; if late by whole intervals, skip them rather than burst. */
		next += interval;
		int64_t late = ticks_until(rdtsc(), next);
		if (late >= 0)
			next += ((uint64_t)late / interval + 1) * interval;
	}
}

/* ---------------------------------------------------------------------------------------- */

void guest_main(uint32_t vcpu, volatile struct abi *abi)
{
	if (abi->magic != ABI_MAGIC)
		panic(PANIC_BAD_MAGIC);
	if (abi->version != ABI_VERSION)
		panic(PANIC_BAD_VERSION);
	uint32_t vcpus = abi->vcpus;
	if (vcpus == 0 || vcpus > MAX_VCPUS || vcpu >= vcpus)
		panic(PANIC_BAD_VCPUS);

	volatile struct status *st = &abi->status[vcpu];
	st->running = 1;

	switch (abi->kind) {
	case KIND_IDLE:
		run_idle();
	case KIND_DIRTY:
		run_dirty(vcpu, abi, st);
	case KIND_SPIN:
		run_spin(abi, st);
	case KIND_TICKER:
		run_ticker(vcpu, abi, st);
	case KIND_ECHO:
		run_echo(vcpu, abi, st);
	default:
		panic(PANIC_UNKNOWN_KIND);
	}
}
