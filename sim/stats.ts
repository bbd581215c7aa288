// Latency figures in microseconds, recorded in an HDR histogram so that the
// tail (p99, max) is exact to three significant digits at any count.
import hdr from 'hdr-histogram-js';

/** Monotonic microseconds within this process (connect times, fan-out, completion). */
export const monotonicUs = (): number => performance.now() * 1000;

/**
 * Wall-clock microseconds, comparable between processes on one machine
 * (a publish timestamp read by another process).
 */
export const wallUs = (): number => (performance.timeOrigin + performance.now()) * 1000;

export interface LatencySummary {
  count: number;
  p50_us: number;
  p99_us: number;
  max_us: number;
  mean_us: number;
}

export class Latency {
  private readonly histogram = hdr.build({
    lowestDiscernibleValue: 1,
    // One hour: nothing measured here takes longer, and autoResize covers it if it did.
    highestTrackableValue: 3_600_000_000,
    numberOfSignificantValueDigits: 3,
    autoResize: true,
    useWebAssembly: false,
  });

  record(us: number): void {
    this.histogram.recordValue(Math.max(1, Math.round(us)));
  }

  /** Adds every value recorded in `other`. */
  add(other: Latency): void {
    this.histogram.add(other.histogram);
  }

  get count(): number {
    return this.histogram.totalCount;
  }

  percentile(p: number): number {
    // HDR reports the top of the value's bucket; never above the exact maximum.
    return this.count === 0 ? 0 : Math.min(this.histogram.getValueAtPercentile(p), this.histogram.maxValue);
  }

  summary(): LatencySummary {
    if (this.count === 0) return { count: 0, p50_us: 0, p99_us: 0, max_us: 0, mean_us: 0 };
    return {
      count: this.count,
      p50_us: this.percentile(50),
      p99_us: this.percentile(99),
      max_us: this.histogram.maxValue,
      mean_us: Math.round(this.histogram.mean),
    };
  }
}
