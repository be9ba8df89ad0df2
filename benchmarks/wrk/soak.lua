-- wrk script of benchmarks/soak.py: mixed POST /counterfactual load (n = 1), and a JSON summary when it ends.
--
--   wrk -t1 -c32 -d60s --timeout 35s -s benchmarks/wrk/soak.lua URL/counterfactual -- MODEL HIT_BASE DISTINCT HIT_SHARE MISS_BASE
--
-- With probability HIT_SHARE a request is one of DISTINCT cached bodies (seeds HIT_BASE .. HIT_BASE + DISTINCT - 1,
-- which the caller has requested once beforehand), else a fresh seed (MISS_BASE + thread id * 2^32 + a per-thread
-- counter) that misses the cache; labels cycle with the seed, as in counterfactual.lua. `done` prints one line
-- "WRK_JSON {...}" with the fields counterfactual.lua prints (statuses, X-Cache, 429s with Retry-After, latency
-- percentiles in microseconds, errors) plus 2xx and other answers per wall-clock second, which place failures
-- against the fault windows. Seeds stay below 2^53, so Lua's doubles hold them exactly.

local threads = {}

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

local function body_for(seed)
   return string.format('{"model":"%s","shape":%d,"texture":%d,"background":%d,"n":1,"seed":%.0f}',
      model, seed % 10, math.floor(seed / 10) % 10, math.floor(seed / 100) % 10, seed)
end

function init(args)
   model, hit_base, distinct = args[1], tonumber(args[2]), tonumber(args[3])
   hit_share, miss_base = tonumber(args[4]), tonumber(args[5])
   if model == nil or hit_base == nil or distinct == nil or hit_share == nil or miss_base == nil then
      error("usage: -- MODEL HIT_BASE DISTINCT HIT_SHARE MISS_BASE")
   end
   math.randomseed(miss_base % 2147483647 + id)
   counter = 0
   statuses, x_cache, retry_after, ok_by_second, other_by_second = {}, {}, 0, {}, {}
   wrk.method = "POST"
   wrk.headers["Content-Type"] = "application/json"
   hits = {}
   for i = 0, distinct - 1 do
      hits[i] = wrk.format("POST", nil, nil, body_for(hit_base + i))
   end
end

function request()
   if math.random() < hit_share then
      return hits[math.random(0, distinct - 1)]
   end
   counter = counter + 1
   return wrk.format("POST", nil, nil, body_for(miss_base + id * 4294967296 + counter))
end

function response(status, headers, body)
   local key, second = tostring(status), os.time()
   statuses[key] = (statuses[key] or 0) + 1
   if status >= 200 and status < 300 then
      ok_by_second[second] = (ok_by_second[second] or 0) + 1
   else
      other_by_second[second] = (other_by_second[second] or 0) + 1
   end
   local cache = headers["x-cache"] or headers["X-Cache"]
   if cache then
      x_cache[cache] = (x_cache[cache] or 0) + 1
   end
   if status == 429 and (headers["retry-after"] or headers["Retry-After"]) then
      retry_after = retry_after + 1
   end
end

local function encode(value)
   if type(value) == "table" then
      local parts = {}
      for k, v in pairs(value) do
         table.insert(parts, string.format("%q:%s", tostring(k), encode(v)))
      end
      return "{" .. table.concat(parts, ",") .. "}"
   elseif type(value) == "string" then
      return string.format("%q", value)
   elseif value ~= value or value == math.huge or value == -math.huge then
      return "null"
   end
   return string.format("%.17g", value)
end

local function add(into, counts)
   for k, v in pairs(counts or {}) do
      into[k] = (into[k] or 0) + v
   end
end

function done(summary, latency, requests)
   local all = {statuses = {}, x_cache = {}, ok_by_second = {}, other_by_second = {}}
   local all_retry = 0
   for _, thread in ipairs(threads) do
      for name, into in pairs(all) do
         add(into, thread:get(name))
      end
      all_retry = all_retry + (thread:get("retry_after") or 0)
   end
   local percentiles = {}
   for _, p in ipairs({50, 90, 99, 99.9}) do
      percentiles[tostring(p)] = latency:percentile(p)
   end
   io.write("WRK_JSON " .. encode({
      duration_us = summary.duration, requests = summary.requests, bytes = summary.bytes,
      errors = summary.errors, statuses = all.statuses, x_cache = all.x_cache, retry_after = all_retry,
      ok_by_second = all.ok_by_second, other_by_second = all.other_by_second,
      latency_us = {min = latency.min, max = latency.max, mean = latency.mean, stdev = latency.stdev,
                    percentiles = percentiles},
   }) .. "\n")
end
