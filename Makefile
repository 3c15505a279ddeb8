# Makefile for portal_sync (PGXS)

EXTENSION = portal_sync
MODULE_big = portal_sync
OBJS = $(patsubst %.c,%.o,$(sort $(wildcard src/*.c)))
PGFILEDESC = "portal_sync - stream EHR changes to a patient portal"

DATA = $(wildcard sql/portal_sync--*.sql)

REGRESS = $(patsubst sql/%.sql,%,$(sort $(filter-out sql/portal_sync--%,$(wildcard sql/*.sql))))
REGRESS_OPTS = --temp-config=$(srcdir)/test/regress.conf --temp-instance=./tmp_check \
	--inputdir=$(srcdir) --load-extension=plpgsql
ifneq ($(wildcard test/t/*.pl),)
TAP_TESTS = 1
PROVE_TESTS = $(sort $(wildcard test/t/*.pl))
endif
EXTRA_CLEAN = tmp_check

PG_CPPFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers \
	-Wno-sign-compare $(shell pkg-config --cflags libcurl json-c zlib)
SHLIB_LINK = $(shell pkg-config --libs libcurl json-c zlib)

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)
include $(PGXS)

# Every object depends on the project's headers.
$(OBJS): $(wildcard src/*.h)
